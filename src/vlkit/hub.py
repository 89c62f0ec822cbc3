"""``from_pretrained``: load a model directory — vlkit's own format, or (through ``vlkit.convert``) a foreign one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlkit.models.base import load_vlkit_directory


def from_pretrained(path: str | Path) -> Any:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    data = json.loads(config_file.read_text())
    if "vlkit_format" in data:
        return load_vlkit_directory(path)
    if "model_type" in data:
        from vlkit.convert import load_hf_directory

        return load_hf_directory(path)
    raise ValueError(f"{config_file}: neither a vlkit config (vlkit_format) nor a Hugging Face one (model_type)")
