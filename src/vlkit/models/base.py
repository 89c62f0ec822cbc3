"""Saving and loading for every vlkit model: a directory with ``config.json`` + ``model.safetensors``
(+ ``tokenizer.json``, + ``generation_config.json``: a generating model's decoding defaults, ``GenerationConfig``'s
fields). Each model class names its config class; the config's ``kind`` picks the class on load.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from vlkit.config import config_from_dict
from vlkit.files import atomic_write, load_safetensors, read_json
from vlkit.text.jinja import write_chat_templates

MODEL_CLASSES: dict[str, type[PretrainedModel]] = {}
FORMAT_VERSION = 1
GENERATION_CONFIG_NAME = "generation_config.json"


class PretrainedModel(nn.Module):
    config_class: ClassVar[type]
    config: Any
    tokenizer: Any = None
    # Decoding defaults (``vlkit.lm.GenerationConfig``) of a model that generates, e.g. a checkpoint's
    # generation_config.json; saved as ``generation_config.json`` in vlkit's own format (its fields).
    generation_config: Any = None
    # True where every parameter is in the state dict and nothing else needs initialising (no buffers): loading then
    # builds the model on the meta device and assigns the read tensors, so weights exist once and keep their dtype.
    meta_init: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            MODEL_CLASSES[cls.config_class.kind] = cls

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = {"vlkit_format": FORMAT_VERSION, **self.config.to_dict()}
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        if self.tokenizer is not None:
            atomic_write(path / "tokenizer.json", self.tokenizer.save)
            # The special tokens by name (so a tokenizer imported with other names than vlkit's <pad>/<eos> reloads, and
            # a saved chat template finds those it reads), the sides, and the class where vlkit read it with one.
            special = self.tokenizer.hf_entries()
            atomic_write(path / "tokenizer_config.json", lambda tmp: Path(tmp).write_text(json.dumps(special) + "\n"))
            write_chat_templates(path, self.tokenizer.chat_template)  # a converted model's Jinja template(s)
        generation = path / GENERATION_CONFIG_NAME
        if self.generation_config is not None:
            text = json.dumps({"vlkit_format": FORMAT_VERSION, **self.generation_config.to_dict()}, indent=2) + "\n"
            atomic_write(generation, lambda tmp: Path(tmp).write_text(text))
        else:  # one left by an earlier save would give this model decoding defaults it does not have
            generation.unlink(missing_ok=True)
        return path


def build_model(config: Any) -> PretrainedModel:
    if config.kind not in MODEL_CLASSES:
        raise ValueError(f"no model class for config kind {config.kind!r}")
    return MODEL_CLASSES[config.kind](config)


def read_vlkit_config(path: Path) -> Any:
    """The model config of a vlkit model directory (its ``config.json``)."""
    config_file = path / "config.json"
    data = read_json(config_file)
    data.pop("vlkit_format", None)
    try:
        return config_from_dict(object, data)
    except (ValueError, TypeError) as error:
        # A config that parses but describes no model (hand-edited, or from another vlkit version): name the file.
        raise ValueError(f"{config_file}: {error}") from None


def read_vlkit_tokenizer(path: Path, config: Any) -> Any:
    """The tokenizer a vlkit model directory keeps (``tokenizer.json``), or None; its length limit is the text
    tower's, or the language model's (a VLM's ``lm``)."""
    tokenizer_file = path / "tokenizer.json"
    text_config = getattr(config, "text", None) or getattr(config, "lm", None) or config
    max_len = getattr(text_config, "max_seq_len", None)
    if not tokenizer_file.exists() or max_len is None:
        return None
    if (path / "tokenizer_config.json").exists():
        from vlkit.text.tokenizer import load_tokenizer

        return load_tokenizer(path, max_len=max_len)
    from vlkit.text import Tokenizer

    return Tokenizer.from_file(tokenizer_file, max_len=max_len)


def stored_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The floating dtype most of ``tensors``' elements are stored in (None without floating tensors): a checkpoint's
    dtype where many small norms or biases are kept in float32 beside bf16 matrices."""
    counts: Counter[torch.dtype] = Counter()
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else None


def load_vlkit_directory(path: Path, dtype: torch.dtype | Literal["auto"] | None = None) -> PretrainedModel:
    """A vlkit model directory's model. ``dtype``: a cast; None keeps what a model built on the meta device stores
    and gives the others float32; ``"auto"`` keeps the stored dtype for every model."""
    config = read_vlkit_config(path)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing")
    model = None
    if getattr(MODEL_CLASSES.get(config.kind), "meta_init", False):
        # Built on the meta device and given the read tensors themselves: the weights exist once, in the stored dtype.
        with torch.device("meta"):
            model = build_model(config)
        # A non-persistent buffer (a ViT's 2D RoPE frequencies) is in no file and would stay on the meta device:
        # such a model is built the ordinary way.
        if set(dict(model.named_buffers())) - set(model.state_dict()):
            model = None
    if model is not None:
        state = load_safetensors(weights)
        if dtype is not None and dtype != "auto":
            state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    else:
        model = build_model(config)
        state = load_safetensors(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        cast = stored_dtype(state.values()) if dtype == "auto" else dtype
        if cast is not None:
            model = model.to(cast)
    if missing or unexpected:
        raise ValueError(f"{weights}: missing keys {missing[:5]}..., unexpected keys {unexpected[:5]}...")
    generation_file = path / GENERATION_CONFIG_NAME
    if generation_file.exists():
        from vlkit.lm.generate import GenerationConfig

        data = read_json(generation_file)
        data.pop("vlkit_format", None)
        try:
            model.generation_config = GenerationConfig.from_dict(data)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{generation_file}: {error}") from None
    tokenizer = read_vlkit_tokenizer(path, config)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model
