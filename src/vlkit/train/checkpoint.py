"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder ``out_dir/checkpoints/step_{step:08d}/`` holding

- ``model.safetensors``: the model state dict (tied tensors stored once, ``safetensors.torch.save_model``),
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.{param_index}.{name}``,
- ``rng.safetensors``: torch CPU (and CUDA) generator states as uint8 tensors,
- ``trainer_state.json``: step, data position, scheduler state, optimizer hyperparameters and non-tensor
  state, python/numpy RNG states, vlkit version and the training config.

The folder is written under a temporary name in the same parent and renamed into place, then the
``checkpoints/latest`` pointer is replaced atomically, so a crash at any moment leaves either the old or the
new checkpoint, never half of one. Nothing is unpickled: ``torch.load`` is never used.
"""

import importlib.metadata
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from vlkit.files import write_text_atomic

__all__ = ["load_checkpoint", "load_latest", "save_checkpoint", "write_text_atomic"]

CHECKPOINT_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
_STEP_PREFIX = "step_"
_TEMP_PREFIX = ".tmp-"
_TRAINER_STATE = "trainer_state.json"


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


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_checkpoints: int = 2,
) -> Path:
    """Write ``out_dir/checkpoints/step_{step:08d}`` atomically, point ``latest`` at it and prune old ones.

    ``trainer_state`` must be JSON-serialisable (step, data position, scheduler state, config...); the
    optimizer's hyperparameters, the RNG states and the vlkit version are added here. The global RNG states are
    captured at call time, so call this exactly where a resumed run should continue from.
    """
    root = Path(out_dir) / CHECKPOINT_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.startswith(_TEMP_PREFIX):
            # Leftovers of a run killed mid-write; they were never published, so nobody can be reading them.
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    final = root / f"{_STEP_PREFIX}{step:08d}"
    temporary = root / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
    temporary.mkdir()

    save_model(model, str(temporary / "model.safetensors"))
    optimizer_tensors, optimizer_json = _optimizer_to_safetensors(optimizer)
    save_file(optimizer_tensors, str(temporary / "optimizer.safetensors"))
    rng_tensors, rng_json = _capture_rng()
    save_file(rng_tensors, str(temporary / "rng.safetensors"))
    state = {**trainer_state, "step": step, "optimizer": optimizer_json, "rng": rng_json}
    state["vlkit_version"] = _vlkit_version()
    (temporary / _TRAINER_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    for file in temporary.iterdir():
        _fsync_path(file)
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
    return final


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


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True
) -> dict[str, Any]:
    """Load a checkpoint folder into ``model`` (and ``optimizer``), restore the RNG states, return the state.

    The returned dict is the saved ``trainer_state`` (including ``step``). With ``restore_rng`` the python,
    numpy and torch generators are reset to their values at save time, so call this last before training on.
    """
    path = Path(path)
    load_model(model, path / "model.safetensors", strict=True)
    state = json.loads((path / _TRAINER_STATE).read_text(encoding="utf-8"))
    if optimizer is not None:
        _optimizer_from_safetensors(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    if restore_rng:
        _restore_rng(load_file(path / "rng.safetensors"), state["rng"])
    return state
