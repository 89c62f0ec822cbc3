"""``from_pretrained``: load a model directory — vlkit's own format, or (through ``vlkit.convert``) a foreign one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlkit.files import read_json
from vlkit.models.base import load_vlkit_directory


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None) -> Any:
    """``dtype``: cast the weights to it (a ``torch.dtype`` or its name, ``"bfloat16"``). None keeps what a language
    model's directory stores (such a model is built on the meta device and filled without a second copy; a checkpoint
    that mixes dtypes takes the one most of its weights are in) and gives the other models float32; ``"auto"`` keeps
    the stored dtype for every model (the one most of its weights' elements have)."""
    auto = dtype == "auto"
    dtype = _dtype(dtype)
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    data = read_json(config_file)
    if "vlkit_format" in data:
        return load_vlkit_directory(path, "auto" if auto else dtype)
    if "model_type" in data:
        from vlkit.convert import load_hf_directory

        return load_hf_directory(path, "auto" if auto else dtype)
    raise ValueError(f"{config_file}: neither a vlkit config (vlkit_format) nor a Hugging Face one (model_type)")


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    found = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"dtype {value!r} is not a floating torch dtype (e.g. torch.bfloat16, 'float16' or 'auto')")
    return found
