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

Decoding defaults. A language model's or LLaVA's ``generation_config.json`` gives the loaded model a
``generation_config`` (``vlkit.lm.GenerationConfig``), which its ``generate`` starts from as transformers'
``generate(**inputs)`` does: do_sample, temperature, top_k, top_p, repetition_penalty, max_new_tokens, min_new_tokens,
pad_token_id and stop_strings, with transformers' defaults for those the file leaves out (top_k 50, temperature, top_p
and the penalty 1.0). As in transformers, the file alone decides the stop ids and the pad id: its end-of-sequence ids
(none when it names none, whatever ``config.json`` says) are the defaults' ``stop_token_ids`` and, where it names
some, the language model's too; without a pad id of its own, finished rows continue with the first stop id (the
caller's, where ``generate`` is given some), not ``config.json``'s pad id. ``max_length`` (prompt + new tokens, in
public checkpoints usually the context length) is not read: vlkit's budget is ``max_new_tokens``, the file's or else 32.
Options vlkit does not implement (beam search, ``no_repeat_ngram_size``, ``min_p``, ...) are named in one warning at
load and ignored. ``export_hf`` writes the model's defaults back as a ``generation_config.json`` (``max_new_tokens``
always, so transformers generates as many tokens as vlkit); a model without defaults gets none, and decodes greedily in
both. BLIP-2's is neither read nor written (with a warning), as transformers' BLIP-2 decodes with its language model's
defaults from ``text_config``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

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
from vlkit.lm import DecoderLM, GenerationConfig
from vlkit.models import DualEncoder, ImageClassifier
from vlkit.models.base import GENERATION_CONFIG_NAME, stored_dtype
from vlkit.models.vlm import VisionLanguageModel
from vlkit.text.jinja import write_chat_templates
from vlkit.text.tokenizer import load_tokenizer

FORMATS: dict[str, ModuleType] = {
    model_type: module
    for module in (clip, siglip, siglip2, vit, convnext, llama, opt, llava, blip2)
    for model_type in getattr(module, "MODEL_TYPES", (module.MODEL_TYPE,))
}
MAX_SHARD_BYTES = 5 * 2**30


def load_hf_directory(
    path: str | Path, dtype: torch.dtype | Literal["auto"] | None = None
) -> DualEncoder | ImageClassifier | DecoderLM | VisionLanguageModel:
    """A transformers directory as a vlkit model. ``dtype``: a cast; None keeps a language model's stored dtype and
    gives the others float32; ``"auto"`` keeps the stored dtype (by elements, where the weights mix several)."""
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
    generation = None
    # BLIP-2's is not read: transformers' Blip2ForConditionalGeneration.generate hands decoding to its language model,
    # whose defaults come from text_config, so a generation_config.json there changes nothing.
    if module in (llama, opt, llava) and (directory / GENERATION_CONFIG_NAME).is_file():
        generation = read_json(directory / GENERATION_CONFIG_NAME)
        config = _with_generation_eos(config, generation, nested=module is llava)
    if hasattr(module, "load_directory"):
        model = module.load_directory(directory, config, None if dtype == "auto" else dtype)
    else:
        weights = read_weights(directory)
        if dtype == "auto":
            dtype = stored_dtype(weights.values())
        model = module.load(HFCheckpoint(config, weights), str(directory))
        if dtype is not None:
            model = model.to(dtype)
    if isinstance(model, DualEncoder):
        model.tokenizer = load_tokenizer(directory, model.config.text.max_seq_len, model_type)
    elif isinstance(model, DecoderLM):
        model.tokenizer = load_tokenizer(directory, model.config.max_seq_len, model_type)
    elif isinstance(model, VisionLanguageModel):
        model.tokenizer = load_tokenizer(directory, model.config.lm.max_seq_len, model_type)
    if generation is not None:
        model.generation_config = read_generation_config(generation, directory / GENERATION_CONFIG_NAME)
    return model


# transformers' values for the decoding options a generation_config.json leaves out
# (GenerationConfig._get_default_generation_params, transformers 5): what its generate uses in their place.
HF_GENERATION_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                          "repetition_penalty": 1.0, "min_new_tokens": 0}  # fmt: skip
# Options of transformers' generate that change the tokens it picks and that vlkit does not implement, with the values
# at which they do nothing. (max_length is left out on purpose: see the module's docstring.)
HF_UNSUPPORTED_GENERATION: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,), "num_beam_groups": (1,), "penalty_alpha": (0,), "dola_layers": (), "diversity_penalty": (0,),
    "min_length": (0,), "no_repeat_ngram_size": (0,), "encoder_repetition_penalty": (1.0,),
    "bad_words_ids": (), "force_words_ids": (), "constraints": (), "sequence_bias": (), "suppress_tokens": (),
    "begin_suppress_tokens": (), "forced_bos_token_id": (), "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (), "guidance_scale": (1.0,), "num_return_sequences": (1,), "max_time": (),
    "watermarking_config": (), "token_healing": (False,),
}  # fmt: skip
# The same, for options that act only when sampling.
HF_UNSUPPORTED_SAMPLING: dict[str, tuple[Any, ...]] = {
    "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "min_p": (), "top_h": (),
}  # fmt: skip


def read_generation_config(generation: dict[str, Any], source: str | Path = GENERATION_CONFIG_NAME) -> GenerationConfig:
    """A transformers ``generation_config.json`` as vlkit's decoding defaults (see the module's docstring). Options
    vlkit cannot apply are named in one ``UserWarning`` and left out; the file's end-of-sequence ids (``()`` without
    any) are the stop ids, its pad id (None without one: the first stop id) the pad id."""
    given = {key: value for key, value in generation.items() if value is not None and value != []}
    value = {**HF_GENERATION_DEFAULTS, **given}.get
    do_sample = bool(value("do_sample"))
    unsupported = HF_UNSUPPORTED_GENERATION | (HF_UNSUPPORTED_SAMPLING if do_sample else {})
    ignored = [f"{key}={given[key]!r}" for key, inert in unsupported.items()
               if key in given and given[key] not in inert]  # fmt: skip
    # The sampling options are kept when decoding greedily too (a caller's do_sample=True then samples with them, as in
    # transformers), but only checked when sampling: greedy, transformers ignores whatever they hold.
    # A greedy file's temperature 0.0 is kept: a caller's do_sample=True is then refused, as transformers refuses it.
    temperature, top_k, top_p = float(value("temperature")), int(value("top_k")), float(value("top_p"))
    if temperature <= 0 and do_sample:
        raise ConversionError(f"{source}: do_sample with temperature={temperature!r}; transformers refuses it too")
    options: dict[str, Any] = {
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k or None,  # 0: no top-k
        "top_p": top_p if top_p < 1.0 else None,  # 1: no top-p
        "repetition_penalty": float(value("repetition_penalty")),
        "min_new_tokens": int(value("min_new_tokens")),
    }
    if generation.get("max_new_tokens") is not None:
        options["max_new_tokens"] = int(generation["max_new_tokens"])
    # transformers decodes with this file alone: it stops at the file's end-of-sequence ids only (at none without
    # them, not at config.json's), and without a pad id of its own pads with the first of the stop ids in effect (a
    # caller's too), which GenerationConfig's pad_token_id None means for a config that names its stop ids
    eos, pad = generation.get("eos_token_id"), generation.get("pad_token_id")
    options["stop_token_ids"] = tuple(int(i) for i in ([] if eos is None else eos if isinstance(eos, list) else [eos]))
    if pad is not None:
        options["pad_token_id"] = int(pad)
    stop = generation.get("stop_strings")
    if stop:
        options["stop_strings"] = (stop,) if isinstance(stop, str) else tuple(stop)
    if ignored:
        warnings.warn(
            f"{source}: vlkit's generate does not implement {', '.join(ignored)}; it decodes without "
            "them, so its output can differ from transformers' generate",
            UserWarning,
            stacklevel=3,
        )
    try:
        return GenerationConfig(**options)
    except ValueError as error:
        raise ConversionError(f"{source}: {error}") from None


def hf_generation_config(config: GenerationConfig, eos_token_ids: tuple[int, ...], pad_token_id: int | None,
                         bos_token_id: int | None = None) -> dict[str, Any]:  # fmt: skip
    """``config`` as a transformers ``generation_config.json``: the options whose values differ from transformers'
    defaults, ``do_sample`` and ``max_new_tokens`` always; ``stop_token_ids`` (when set; none written for ``()``) as
    the end-of-sequence ids, and the pad id it decodes with (none written where that is the first stop id, which
    transformers then takes in the same way, a caller's included)."""
    eos = list(eos_token_ids if config.stop_token_ids is None else config.stop_token_ids)
    # A config that names its stop ids pads with its own pad id, else the first of them: transformers' rule for a
    # file's; one that takes the model's stop ids takes its pad id too.
    pad = config.pad_token_id if config.pad_token_id is not None or config.stop_token_ids is not None else pad_token_id
    options = {
        "temperature": config.temperature,
        "top_k": config.top_k or 0,  # vlkit's None: no top-k, which transformers spells 0
        "top_p": 1.0 if config.top_p is None else config.top_p,
        "repetition_penalty": config.repetition_penalty,
        "min_new_tokens": config.min_new_tokens,
    }
    out: dict[str, Any] = {key: value for key, value in options.items() if value != HF_GENERATION_DEFAULTS[key]}
    out.update(do_sample=config.do_sample, max_new_tokens=config.max_new_tokens)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if pad is not None:
        out["pad_token_id"] = pad
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if config.stop_strings:
        out["stop_strings"] = list(config.stop_strings)
    return out


def _with_generation_eos(config: dict[str, Any], generation: dict[str, Any], nested: bool) -> dict[str, Any]:
    """``config`` with the end-of-sequence ids of ``generation_config.json``, which transformers' ``generate`` stops
    at in place of ``config.json``'s (instruct models list their end-of-turn token there). ``nested``: a VLM, whose
    language model's ids sit in ``text_config``. A file without any leaves ``config``'s (its decoding defaults then stop
    at none: ``read_generation_config``)."""
    eos = generation.get("eos_token_id")
    if eos is None or eos == []:
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
    # Asked before anything is written: a processor whose images transformers cannot prepare alike is an error.
    image_processor = getattr(processor, "image_processor", None)
    try:
        image_settings = None if image_processor is None else image_processor.to_hf_dict()
    except ValueError as error:
        raise ConversionError(f"export_hf: {error}") from None
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
        entries = tokenizer.hf_entries(vocabulary_only=True)
        if isinstance(model, VisionLanguageModel):
            # A vision-language model's prompts pad on the left to generate: its processor's side, written below
            # (vlkit's load_processor pads a LLaVA directory without one on the left).
            entries.pop("padding_side")
        write_json(
            directory / "tokenizer_config.json",
            {
                **getattr(tokenizer, "hf_settings", {}),  # a converted model's bos / unk tokens, sides, ...
                "tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json alone (CLIP's: its own class)
                **entries,
                "model_max_length": tokenizer.max_len,
            },
        )
    if image_settings is not None:
        write_json(directory / "preprocessor_config.json", image_settings)
    if tokenizer is not None or isinstance(processor, VLMProcessor):  # the processor's template, as transformers'
        stored = getattr(processor, "chat_template", None) if isinstance(processor, VLMProcessor) else None
        write_chat_templates(directory, stored if stored is not None else getattr(tokenizer, "chat_template", None))
    # BLIP-2's decoding defaults are text_config's in transformers, which reads no generation_config.json for it.
    generation = getattr(model, "generation_config", None)
    if generation is not None and module is blip2:
        warnings.warn("export_hf: a BLIP-2 model's decoding defaults are not exported (transformers' BLIP-2 decodes "
                      "with its language model's, from text_config)", UserWarning, stacklevel=2)  # fmt: skip
        generation = None
    if generation is not None:
        lm = model.config.lm if isinstance(model, VisionLanguageModel) else model.config
        write_json(directory / GENERATION_CONFIG_NAME,
                   hf_generation_config(generation, lm.eos_token_ids, lm.pad_token_id, lm.bos_token_id))  # fmt: skip
    elif isinstance(model, DecoderLM | VisionLanguageModel):  # one left by an earlier export would change decoding
        (directory / GENERATION_CONFIG_NAME).unlink(missing_ok=True)
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
    index = directory / INDEX_NAME
    earlier = set(read_json(index).get("weight_map", {}).values()) if index.is_file() else set()
    for name, shard in zip(names, shards, strict=True):
        copies = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in shard.items()}
        atomic_write(directory / name, lambda tmp, copies=copies: save_file(copies, tmp, metadata={"format": "pt"}))
        del copies
    # A directory written before with the other layout would be ambiguous to readers, and its shards that this
    # export did not overwrite would be left behind.
    stale = [index] if len(shards) == 1 else [directory / WEIGHTS_NAME]
    stale += [directory / name for name in sorted(earlier - set(names)) if Path(name).name == name]
    for path in stale:
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


__all__ = [
    "FORMATS",
    "ConversionError",
    "export_hf",
    "hf_generation_config",
    "load_hf_directory",
    "read_generation_config",
]
