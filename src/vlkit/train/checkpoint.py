"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder ``out_dir/checkpoints/step_{step:08d}/`` holding

- ``model.safetensors``: the model state dict (tied tensors stored once, ``safetensors.torch.save_model``),
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.{param_index}.{name}``,
- ``rng.safetensors``: torch CPU (and CUDA) generator states as uint8 tensors,
- ``trainer_state.json``: step, data position, scheduler state, optimizer hyperparameters and non-tensor
  state, python/numpy RNG states, vlkit version and the training config.

In a multi-process run the RNG states of ranks 1..W-1 are stored too (``rank{r}.``-prefixed tensors and
``rng_ranks`` in the JSON), so a resumed run with the same world size continues every rank's random stream.

Sharded (FSDP2) checkpoints replace the two model/optimizer files with ``dcp/``: a ``torch.distributed.checkpoint``
folder holding each rank's shards of ``{"model": ..., "optim": ...}`` as produced by
``torch.distributed.checkpoint.state_dict.get_state_dict`` (parameter-name keyed, so a run saved by W ranks loads
into any other number of ranks, or into an unsharded model). The other files are the same.

The folder is written under a temporary name in the same parent and renamed into place, then the
``checkpoints/latest`` pointer is replaced atomically, so a crash at any moment leaves either the old or the
new checkpoint, never half of one. Nothing is unpickled: ``torch.load`` is never used (DCP's metadata file is the
one pickle, and ``torch.distributed.checkpoint`` reads only checkpoints this run's own processes wrote).

Damage after publication (a disk that filled up or lost a write, a copy of the run folder that stopped early, a
file deleted by hand) is caught by ``manifest.json``, written last into the folder: the size and SHA-256 of every
other file (``sha256sum`` checks them too). ``load_latest`` verifies candidates newest first, logs a warning
naming each damaged one and why, and returns the newest intact one, so a resumed run continues from there.
Checkpoints written before the manifest existed get the checks their files allow: ``trainer_state.json`` parses,
every safetensors header parses and the file is exactly as long as the header says.
"""

import contextlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from vlkit.files import DamagedFileError, check_safetensors, load_safetensors, read_json, sha256_file, write_text_atomic
from vlkit.train import distributed

__all__ = [
    "RngState",
    "capture_rng_state",
    "is_sharded_checkpoint",
    "load_checkpoint",
    "load_latest",
    "load_sharded_checkpoint",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "verify_checkpoint",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
_STEP_PREFIX = "step_"
_TEMP_PREFIX = ".tmp-"
_TRAINER_STATE = "trainer_state.json"
_SHARDED_DIRNAME = "dcp"
_MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
# The files every single-file checkpoint holds, whatever vlkit version wrote it; sharded ones hold dcp/ instead.
_SINGLE_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


@dataclass
class RngState:
    """One process's random state: generator tensors (torch CPU/CUDA) and python/numpy states (JSON-able)."""

    tensors: dict[str, torch.Tensor]
    states: dict[str, Any]


def _vlkit_version() -> str:
    try:
        return importlib.metadata.version("vlkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _fsync_path(path: Path) -> None:
    # Renames are only atomic across power loss when the data they publish reached the disk first.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _step_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith(_STEP_PREFIX) and entry.name[len(_STEP_PREFIX) :].isdigit():
            yield int(entry.name[len(_STEP_PREFIX) :]), entry


def _optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for index, parameter_state in state_dict["state"].items():
        for name, value in parameter_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                extra.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state_extra": extra}


def _optimizer_from_safetensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in saved["state_extra"].items():
        state.setdefault(int(index), {}).update(values)
    param_groups = []
    # JSON turns tuples (AdamW betas) into lists; give each hyperparameter back the type the optimizer uses.
    for current, loaded in zip(optimizer.param_groups, saved["param_groups"], strict=False):
        group = dict(loaded)
        for key, value in current.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        param_groups.append(group)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint has {len(saved['param_groups'])} optimizer parameter groups, "
            f"the optimizer has {len(optimizer.param_groups)}; were the param group rules changed?"
        )
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{index}"] = cuda_state
    python_version, python_state, python_gauss = random.getstate()
    numpy_kind, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    states = {
        "python": {"version": python_version, "state": list(python_state), "gauss_next": python_gauss},
        "numpy": {
            "kind": numpy_kind,
            "keys": numpy_keys.tolist(),
            "position": int(numpy_position),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
    }
    return tensors, states


def capture_rng_state() -> RngState:
    """This process's python, numpy and torch RNG states, to pass to ``save_checkpoint(rng_states=...)``."""
    return RngState(*_capture_rng())


def _rank_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any], rank: int) -> RngState | None:
    """Rank ``rank``'s saved RNG state, or None if the checkpoint was written by fewer ranks."""
    if rank == 0:
        return RngState(tensors={k: v for k, v in tensors.items() if not k.startswith("rank")}, states=state["rng"])
    prefix = f"rank{rank}."
    states = state.get("rng_ranks", {}).get(str(rank))
    if states is None:
        return None
    return RngState({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, states)


def _write_rng(folder: Path, rng_states: Sequence[RngState] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write rng.safetensors; return (rank 0's JSON states, the other ranks' JSON states by rank)."""
    rng_states = list(rng_states) if rng_states is not None else [capture_rng_state()]
    tensors = dict(rng_states[0].tensors)
    for rank, rng in enumerate(rng_states[1:], start=1):
        tensors |= {f"rank{rank}.{key}": value for key, value in rng.tensors.items()}
    save_file(tensors, str(folder / "rng.safetensors"))
    return rng_states[0].states, {str(rank): rng.states for rank, rng in enumerate(rng_states) if rank > 0}


def _restore_rng(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith("torch_cuda.")]
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint holds RNG states for {len(cuda_states)} CUDA devices, "
                f"this machine has {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(cuda_states)
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )


def _clean_temporaries(root: Path) -> None:
    for entry in root.iterdir():
        if entry.name.startswith(_TEMP_PREFIX):
            # Leftovers of a run killed mid-write; they were never published, so nobody can be reading them.
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _publish(root: Path, temporary: Path, final: Path, keep_checkpoints: int) -> None:
    """fsync ``temporary``, rename it to ``final``, point ``latest`` at it and prune the oldest checkpoints."""
    for entry in temporary.rglob("*"):
        _fsync_path(entry)
    _fsync_path(temporary)
    if final.exists():
        # Only possible after a crash between publishing this step and updating ``latest``; the new copy wins.
        stale = root / f"{_TEMP_PREFIX}stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(temporary, final)
    _fsync_path(root)
    write_text_atomic(root / LATEST_FILENAME, final.name + "\n")
    # Keep this checkpoint and the newest older ones. Steps past this one belong to a timeline the run left (it
    # resumed from an older checkpoint because the newer ones were damaged): pruned first, never this one.
    current = int(final.name[len(_STEP_PREFIX) :])
    older = sorted(entry for entry in _step_dirs(root) if entry[0] < current)
    kept = {final, *(path for _, path in (older[-(keep_checkpoints - 1) :] if keep_checkpoints > 1 else []))}
    for _, old in list(_step_dirs(root)):
        if old not in kept:
            shutil.rmtree(old)


def _write_trainer_state(
    folder: Path, step: int, trainer_state: dict[str, Any], rng_states: Sequence[RngState] | None, **extra: Any
) -> None:
    rng_json, rank_rng_json = _write_rng(folder, rng_states)
    state = {**trainer_state, "step": step, **extra, "rng": rng_json}
    if rank_rng_json:
        state["rng_ranks"] = rank_rng_json
    state["vlkit_version"] = _vlkit_version()
    (folder / _TRAINER_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")


def _write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in ``folder``; called last, once everything else is written."""
    files = {}
    for entry in sorted(folder.rglob("*")):
        if entry.is_file() and entry != folder / _MANIFEST:
            # Hashing reads the files back, so the digest is of what reached the filesystem, not of what we meant.
            files[entry.relative_to(folder).as_posix()] = {"size": entry.stat().st_size, "sha256": sha256_file(entry)}
    manifest = {"format": _MANIFEST_FORMAT, "files": files}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def verify_checkpoint(path: Path) -> None:
    """Raise ``DamagedFileError`` (naming the damaged file) unless the checkpoint folder ``path`` is intact.

    With a manifest every recorded file must exist with its recorded size and SHA-256. Without one (written
    before vlkit recorded manifests) the trainer state must parse, the expected files exist and every safetensors
    file be structurally whole (see ``vlkit.files.check_safetensors``).
    """
    path = Path(path)
    manifest_file = path / _MANIFEST
    if manifest_file.is_file():
        files = read_json(manifest_file).get("files")
        if not isinstance(files, dict) or _TRAINER_STATE not in files:
            raise DamagedFileError(manifest_file, "does not list the checkpoint's files")
        for name, record in sorted(files.items()):
            if not (isinstance(record, dict) and isinstance(record.get("size"), int) and "sha256" in record):
                raise DamagedFileError(manifest_file, f"bad entry for {name!r}")
            entry = path / name
            if not entry.is_file():
                raise DamagedFileError(entry, "missing (listed in manifest.json)")
            size = entry.stat().st_size
            if size != record["size"]:
                raise DamagedFileError(entry, f"{size} bytes, but {record['size']} were written (truncated?)")
            if sha256_file(entry) != record["sha256"]:
                raise DamagedFileError(entry, "contents differ from those written (SHA-256 mismatch)")
        return
    if not (path / _TRAINER_STATE).is_file():
        raise DamagedFileError(path / _TRAINER_STATE, "missing")
    read_json(path / _TRAINER_STATE)
    if is_sharded_checkpoint(path):
        required = [f"{_SHARDED_DIRNAME}/.metadata", "rng.safetensors"]
    else:
        required = list(_SINGLE_FILES)
    for name in required:
        if not (path / name).is_file():
            raise DamagedFileError(path / name, "missing")
    for entry in sorted(path.glob("*.safetensors")):
        check_safetensors(entry)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_checkpoints: int = 2,
    rng_states: Sequence[RngState] | None = None,
) -> Path:
    """Write ``out_dir/checkpoints/step_{step:08d}`` atomically, point ``latest`` at it and prune old ones.

    ``trainer_state`` must be JSON-serialisable (step, data position, scheduler state, config...); the
    optimizer's hyperparameters, the RNG states and the vlkit version are added here. ``rng_states`` holds one
    ``RngState`` per rank (rank 0 first); by default this process's states are captured at call time, so call
    this exactly where a resumed run should continue from. In a DDP run only rank 0 calls this.
    """
    root = Path(out_dir) / CHECKPOINT_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(root)
    final = root / f"{_STEP_PREFIX}{step:08d}"
    temporary = root / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
    temporary.mkdir()

    save_model(model, str(temporary / "model.safetensors"))
    optimizer_tensors, optimizer_json = _optimizer_to_safetensors(optimizer)
    save_file(optimizer_tensors, str(temporary / "optimizer.safetensors"))
    _write_trainer_state(temporary, step, trainer_state, rng_states, optimizer=optimizer_json)
    _write_manifest(temporary)
    _publish(root, temporary, final, keep_checkpoints)
    return final


def save_sharded_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_checkpoints: int = 2,
    rng_states: Sequence[RngState] | None = None,
) -> Path:
    """The sharded (FSDP2) twin of ``save_checkpoint``: a collective every rank calls with its own shards.

    Every rank writes its shards into rank 0's temporary folder (``out_dir`` must be on a filesystem all ranks
    share); rank 0 adds the trainer state and publishes the folder after a barrier. Works unsharded too (one
    process, no process group), which is how a sharded run is continued on a single process.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out_dir) / CHECKPOINT_DIRNAME
    final = root / f"{_STEP_PREFIX}{step:08d}"
    temporary: Path | None = None
    if distributed.is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        _clean_temporaries(root)
        temporary = root / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
        temporary.mkdir()
    temporary = Path(distributed.broadcast_object(str(temporary)))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _single_process_dcp():
        dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(temporary / _SHARDED_DIRNAME))
    if distributed.is_main_process():
        _write_trainer_state(temporary, step, trainer_state, rng_states, world_size=distributed.get_world_size())
    # Every shard is on disk before rank 0 records the manifest and publishes (dcp.save returns once the metadata is
    # written, but a rank may still be flushing); and nobody moves on before the checkpoint is visible.
    distributed.barrier()
    if distributed.is_main_process():
        _write_manifest(temporary)
        _publish(root, temporary, final, keep_checkpoints)
    distributed.barrier()
    return final


@contextlib.contextmanager
def _single_process_dcp() -> Iterator[None]:
    # Without a process group DCP reads and writes as one process, which is what we want; it warns each time.
    with warnings.catch_warnings():
        if not distributed.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_sharded_checkpoint(path: Path) -> bool:
    """True for a checkpoint folder written by ``save_sharded_checkpoint``."""
    return (Path(path) / _SHARDED_DIRNAME).is_dir()


def load_latest(out_dir: Path) -> Path | None:
    """Return the newest intact checkpoint folder under ``out_dir``, or ``None`` when it holds none at all.

    The folder ``checkpoints/latest`` names comes first when it exists, then the published ``step_*`` folders from
    the highest step down; the first that passes ``verify_checkpoint`` is returned, and each damaged one before it
    is logged as a warning naming the damaged file. Temporary folders from interrupted writes are never returned.
    When checkpoints exist but none is intact, raises ``DamagedFileError`` naming the checkpoints folder: the run
    can no longer be resumed, and silently starting it over would overwrite its log.
    """
    root = Path(out_dir) / CHECKPOINT_DIRNAME
    candidates = [path for _, path in sorted(_step_dirs(root), reverse=True)]
    pointer = root / LATEST_FILENAME
    if pointer.is_file():
        # A damaged pointer (undecodable bytes) names no folder; the step folders are still tried.
        named = root / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    damaged: list[str] = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except DamagedFileError as error:
            logger.warning("checkpoint %s is damaged, skipping it: %s", candidate, error)
            where = error.path.relative_to(root) if error.path.is_relative_to(root) else error.path
            damaged.append(f"{where}: {error.reason}")
            continue
        if damaged:
            logger.warning("continuing from %s, the newest intact checkpoint", candidate)
        return candidate
    if damaged:
        raise DamagedFileError(root, f"no intact checkpoint to resume from: {'; '.join(damaged)}")
    return None


def _restore_rank_rng(path: Path, state: dict[str, Any], rank: int) -> bool:
    rng = _rank_rng(load_safetensors(path / "rng.safetensors"), state, rank)
    if rng is None:
        return False
    _restore_rng(rng.tensors, rng.states)
    return True


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict[str, Any]:
    """Load a checkpoint folder into ``model`` (and ``optimizer``), restore the RNG states, return the state.

    The returned dict is the saved ``trainer_state`` (including ``step``). With ``restore_rng`` the python,
    numpy and torch generators are reset to rank ``rank``'s values at save time, so call this last before
    training on; ``state["rng_restored"]`` is False when the checkpoint holds no state for ``rank`` (it was
    written by fewer ranks).
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a sharded (FSDP) checkpoint; resume it with --strategy fsdp")
    weights = path / "model.safetensors"
    # load_model (not load_safetensors) because it restores tied parameters that save_model stored once.
    check_safetensors(weights)
    try:
        load_model(model, weights, strict=True)
    except SafetensorError as error:
        raise DamagedFileError(weights, f"not a valid safetensors file ({error})") from None
    state = read_json(path / _TRAINER_STATE)
    if optimizer is not None:
        _optimizer_from_safetensors(optimizer, load_safetensors(path / "optimizer.safetensors"), state["optimizer"])
    state["rng_restored"] = restore_rng and _restore_rank_rng(path, state, rank)
    return state


def load_sharded_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, restore_rng: bool = True, rank: int = 0
) -> dict[str, Any]:
    """Load a ``save_sharded_checkpoint`` folder into ``model``/``optimizer`` sharded for *this* world size.

    A collective when a process group is initialised. ``torch.distributed.checkpoint`` reshards on load, so the
    writing and the reading world sizes may differ (2 -> 1, 1 -> 4, ...).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a single-file (DDP / single-process) checkpoint; resume it with --strategy ddp")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optimizer_state}
    with _single_process_dcp():
        dcp.load(loaded, checkpoint_id=str(path / _SHARDED_DIRNAME))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    state = read_json(path / _TRAINER_STATE)
    state["rng_restored"] = restore_rng and _restore_rank_rng(path, state, rank)
    return state
