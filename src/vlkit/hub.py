"""``from_pretrained``: load a model directory — vlkit's own format, or (through ``vlkit.convert``) a foreign one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlkit.files import read_json
from vlkit.models.base import load_vlkit_directory


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    """``dtype``: cast the weights to it; None keeps what a language model's directory stores (such a model is built
    on the meta device and filled without a second copy) and float32 for the other models."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    data = read_json(config_file)
    if "vlkit_format" in data:
        return load_vlkit_directory(path, dtype)
    if "model_type" in data:
        from vlkit.convert import load_hf_directory

        return load_hf_directory(path, dtype)
    raise ValueError(f"{config_file}: neither a vlkit config (vlkit_format) nor a Hugging Face one (model_type)")
