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
"""

import contextlib
import importlib.metadata
import json
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
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from vlkit.files import write_text_atomic
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
    "write_text_atomic",
]

CHECKPOINT_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
_STEP_PREFIX = "step_"
_TEMP_PREFIX = ".tmp-"
_TRAINER_STATE = "trainer_state.json"
_SHARDED_DIRNAME = "dcp"


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
    for _, old in sorted(_step_dirs(root))[:-keep_checkpoints]:
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
    # Every shard is on disk before rank 0 publishes (dcp.save returns once the metadata is written, but a rank
    # may still be flushing); and nobody moves on before the checkpoint is visible.
    distributed.barrier()
    if distributed.is_main_process():
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
    """Return the newest complete checkpoint folder under ``out_dir``, or ``None``.

    ``checkpoints/latest`` is trusted when it names an existing checkpoint; otherwise the highest published
    ``step_*`` folder is used. Temporary folders from interrupted writes are never returned.
    """
    root = Path(out_dir) / CHECKPOINT_DIRNAME
    pointer = root / LATEST_FILENAME
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if candidate.name.startswith(_STEP_PREFIX) and (candidate / _TRAINER_STATE).is_file():
            return candidate
    complete = [path for _, path in sorted(_step_dirs(root)) if (path / _TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def _restore_rank_rng(path: Path, state: dict[str, Any], rank: int) -> bool:
    rng = _rank_rng(load_file(path / "rng.safetensors"), state, rank)
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
    load_model(model, path / "model.safetensors", strict=True)
    state = json.loads((path / _TRAINER_STATE).read_text(encoding="utf-8"))
    if optimizer is not None:
        _optimizer_from_safetensors(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
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
    state = json.loads((path / _TRAINER_STATE).read_text(encoding="utf-8"))
    state["rng_restored"] = restore_rng and _restore_rank_rng(path, state, rank)
    return state
