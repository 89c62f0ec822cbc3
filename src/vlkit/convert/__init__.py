"""Foreign checkpoint formats <-> vlkit models: one module per format, each an explicit key map with shape checks.

``load_hf_directory(path)``: a Hugging Face model directory (``config.json`` with ``model_type`` +
``model.safetensors`` or its sharded index, + ``tokenizer.json``) -> vlkit model; ``vlkit.from_pretrained`` calls
it. ``export_hf(model, path)``: the reverse, a directory transformers' ``from_pretrained`` loads.

| model_type | transformers classes                                  | vlkit model                       |
|------------|-------------------------------------------------------|-----------------------------------|
| clip       | CLIPModel                                             | DualEncoder (softmax loss)        |
| siglip     | SiglipModel                                           | DualEncoder (sigmoid loss)        |
| siglip2    | Siglip2Model (NaFlex)                                 | DualEncoder (sigmoid loss)        |
| vit        | ViTForImageClassification, ViTModel                   | ImageClassifier (0 classes: none) |
| convnext   | ConvNextForImageClassification, ConvNextModel         | ImageClassifier                   |
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from vlkit.convert import clip, convnext, siglip, siglip2, vit
from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    read_weights,
    write_weights,
)
from vlkit.data.processors import Processor
from vlkit.files import atomic_write, read_json, write_json
from vlkit.models import DualEncoder, ImageClassifier
from vlkit.text.tokenizer import load_tokenizer

FORMATS: dict[str, ModuleType] = {module.MODEL_TYPE: module for module in (clip, siglip, siglip2, vit, convnext)}


def load_hf_directory(path: str | Path) -> DualEncoder | ImageClassifier:
    directory = Path(path)
    config = read_json(directory / "config.json")
    model_type = config.get("model_type")
    if model_type not in FORMATS:
        raise ConversionError(f"{directory}: model_type {model_type!r} has no converter; supported: {sorted(FORMATS)}")
    module = FORMATS[model_type]
    architectures = config.get("architectures") or []
    unsupported = [name for name in architectures if name not in module.ARCHITECTURES]
    if unsupported:
        raise ConversionError(
            f"{directory}: architecture {unsupported[0]} is not supported for {model_type}; "
            f"supported: {list(module.ARCHITECTURES)}"
        )
    model = module.load(HFCheckpoint(config, read_weights(directory)), str(directory))
    if isinstance(model, DualEncoder):
        model.tokenizer = load_tokenizer(directory, model.config.text.max_seq_len, model_type)
    return model


def export_hf(model: Any, path: str | Path, processor: Processor | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``
    and ``tokenizer_config.json`` when the model has a tokenizer, + ``preprocessor_config.json`` when a processor
    with an image processor is given). Raises ``ConversionError`` naming every option the format cannot express."""
    module = _format_of(model)
    checkpoint = module.export(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = {tensor.dtype for tensor in checkpoint.weights.values()}
    hf_config = {**checkpoint.config}
    if len(dtypes) == 1:
        hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    write_weights(directory / "model.safetensors", checkpoint.weights)
    write_json(directory / "config.json", hf_config)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        atomic_write(directory / "tokenizer.json", tokenizer.save)
        backend = tokenizer.backend
        write_json(
            directory / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": backend.id_to_token(tokenizer.eos_token_id),
                "pad_token": backend.id_to_token(tokenizer.pad_token_id),
                "model_max_length": tokenizer.max_len,
            },
        )
    if processor is not None and processor.image_processor is not None:
        write_json(directory / "preprocessor_config.json", processor.image_processor.to_hf_dict())
    return directory


def _format_of(model: Any) -> ModuleType:
    if isinstance(model, DualEncoder):
        candidates = [clip, siglip2, siglip]  # siglip2 first: SigLIP also matches its MAP-pooled towers
    elif isinstance(model, ImageClassifier):
        candidates = [vit, convnext]
    else:
        raise ConversionError(f"no Hugging Face format for {type(model).__name__}")
    for module in candidates:
        if module.matches(model.config):
            return module
    vision = model.config.vision
    raise ConversionError(
        f"no Hugging Face format for a {type(model).__name__} with a {type(vision).__name__} image tower "
        f"(pool={getattr(vision, 'pool', None)!r}); CLIP needs pool='cls', SigLIP pool='map'"
    )


__all__ = ["FORMATS", "ConversionError", "export_hf", "load_hf_directory"]
