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
| llama      | LlamaForCausalLM                                      | DecoderLM                         |
| qwen2      | Qwen2ForCausalLM                                      | DecoderLM                         |
| opt        | OPTForCausalLM                                        | DecoderLM                         |
| llava      | LlavaForConditionalGeneration (CLIP / SigLIP tower,   | VisionLanguageModel               |
|            | Llama / Qwen2 LM)                                     |                                   |
| blip-2     | Blip2ForConditionalGeneration (EVA ViT, Q-Former,     | VisionLanguageModel (Q-Former     |
|            | OPT / Llama / Qwen2 LM)                               | bridge)                           |

Language models, LLaVA and BLIP-2 load through their module's ``load_directory``: built on the meta device and
filled tensor by tensor, keeping the stored dtype unless ``dtype`` is given. ``export_hf`` writes shards
(``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) when the weights exceed ``max_shard_bytes``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

from vlkit.bridges import QFormerConfig
from vlkit.convert import blip2, clip, convnext, llama, llava, opt, siglip, siglip2, vit
from vlkit.convert.common import (
    INDEX_NAME,
    WEIGHTS_NAME,
    ConversionError,
    HFCheckpoint,
    read_weights,
)
from vlkit.data.processors import Processor, VLMProcessor
from vlkit.files import atomic_write, read_json, write_json
from vlkit.lm import DecoderLM
from vlkit.models import DualEncoder, ImageClassifier
from vlkit.models.vlm import VisionLanguageModel
from vlkit.text.tokenizer import load_tokenizer

FORMATS: dict[str, ModuleType] = {
    model_type: module
    for module in (clip, siglip, siglip2, vit, convnext, llama, opt, llava, blip2)
    for model_type in getattr(module, "MODEL_TYPES", (module.MODEL_TYPE,))
}
MAX_SHARD_BYTES = 5 * 2**30


def load_hf_directory(
    path: str | Path, dtype: torch.dtype | None = None
) -> DualEncoder | ImageClassifier | DecoderLM | VisionLanguageModel:
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
    if module in (llama, opt, llava, blip2) and (directory / "generation_config.json").is_file():
        generation = read_json(directory / "generation_config.json")
        config = _with_generation_eos(config, generation, nested=module in (llava, blip2))
    if hasattr(module, "load_directory"):
        model = module.load_directory(directory, config, dtype)
    else:
        model = module.load(HFCheckpoint(config, read_weights(directory)), str(directory))
        if dtype is not None:
            model = model.to(dtype)
    if isinstance(model, DualEncoder):
        model.tokenizer = load_tokenizer(directory, model.config.text.max_seq_len, model_type)
    elif isinstance(model, DecoderLM):
        model.tokenizer = load_tokenizer(directory, model.config.max_seq_len, model_type)
    elif isinstance(model, VisionLanguageModel):
        model.tokenizer = load_tokenizer(directory, model.config.lm.max_seq_len, model_type)
    return model


def _with_generation_eos(config: dict[str, Any], generation: dict[str, Any], nested: bool) -> dict[str, Any]:
    """``config`` with the end-of-sequence ids of ``generation_config.json``, which transformers' ``generate`` stops
    at in place of ``config.json``'s (instruct models list their end-of-turn token there). ``nested``: a VLM, whose
    language model's ids sit in ``text_config``."""
    eos = generation.get("eos_token_id")
    if eos is None:
        return config
    if nested:
        return {**config, "text_config": {**(config.get("text_config") or {}), "eos_token_id": eos}}
    return {**config, "eos_token_id": eos}


def export_hf(
    model: Any, path: str | Path, processor: Processor | None = None, max_shard_bytes: int = MAX_SHARD_BYTES
) -> Path:
    """Write ``model`` as a Hugging Face directory: ``config.json`` + ``model.safetensors`` (or its shards above
    ``max_shard_bytes``) (+ ``tokenizer.json`` and ``tokenizer_config.json`` when the model has a tokenizer,
    + ``preprocessor_config.json`` when a processor with an image processor is given, + ``processor_config.json``
    for a LLaVA or BLIP-2 processor). Raises ``ConversionError`` naming every option the format cannot express."""
    module = _format_of(model)
    checkpoint = module.export(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = {tensor.dtype for tensor in checkpoint.weights.values()}
    hf_config = {**checkpoint.config}
    if len(dtypes) == 1:
        hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    _write_shards(directory, checkpoint.weights, max_shard_bytes)
    write_json(directory / "config.json", hf_config)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        atomic_write(directory / "tokenizer.json", tokenizer.save)
        backend = tokenizer.backend
        write_json(
            directory / "tokenizer_config.json",
            {
                **getattr(tokenizer, "hf_settings", {}),  # a converted model's bos / unk tokens, chat template, ...
                "tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json alone
                "eos_token": backend.id_to_token(tokenizer.eos_token_id),
                "pad_token": backend.id_to_token(tokenizer.pad_token_id),
                "model_max_length": tokenizer.max_len,
            },
        )
    if processor is not None and processor.image_processor is not None:
        write_json(directory / "preprocessor_config.json", processor.image_processor.to_hf_dict())
    if isinstance(processor, VLMProcessor):  # Llava/Blip2Processor's settings; prompts to generate pad on the left
        write_json(directory / "processor_config.json", processor.to_hf_dict())
        if tokenizer is not None:
            settings = read_json(directory / "tokenizer_config.json")
            write_json(directory / "tokenizer_config.json", {**settings, "padding_side": processor.padding_side})
    return directory


def _write_shards(directory: Path, weights: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """One ``model.safetensors``, or shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)
    with transformers' index. Each shard's tensors are copied just before writing (views of one parameter share
    storage, which safetensors refuses), so at most one shard exists twice in memory."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(weights):
        nbytes = weights[key].numel() * weights[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += nbytes
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        copies = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in shard.items()}
        atomic_write(directory / name, lambda tmp, copies=copies: save_file(copies, tmp, metadata={"format": "pt"}))
        del copies
    stale = [directory / INDEX_NAME] if len(shards) == 1 else [directory / WEIGHTS_NAME]
    for path in stale:  # a directory written before with the other layout would be ambiguous to readers
        path.unlink(missing_ok=True)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in weights.values())
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _format_of(model: Any) -> ModuleType:
    if isinstance(model, DecoderLM):
        candidates = [llama, opt]
    elif isinstance(model, DualEncoder):
        candidates = [clip, siglip2, siglip]  # siglip2 first: SigLIP also matches its MAP-pooled towers
    elif isinstance(model, ImageClassifier):
        candidates = [vit, convnext]
    elif isinstance(model, VisionLanguageModel):
        # A Q-Former bridge is BLIP-2's; any other is LLaVA's. Each export names every option it cannot express.
        return blip2 if isinstance(model.config.bridge, QFormerConfig) else llava
    else:
        raise ConversionError(f"no Hugging Face format for {type(model).__name__}")
    for module in candidates:
        if module.matches(model.config):
            return module
    if isinstance(model, DecoderLM):
        problems = "; ".join(opt._problems(model.config))
        raise ConversionError(
            f"no Hugging Face format for this DecoderLM: not a Llama/Qwen2 layout, and as OPT: {problems}"
        )
    vision = model.config.vision
    raise ConversionError(
        f"no Hugging Face format for a {type(model).__name__} with a {type(vision).__name__} image tower "
        f"(pool={getattr(vision, 'pool', None)!r}); CLIP needs pool='cls', SigLIP pool='map'"
    )


__all__ = ["FORMATS", "ConversionError", "export_hf", "load_hf_directory"]
