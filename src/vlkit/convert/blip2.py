"""Hugging Face ``Blip2ForConditionalGeneration`` (Li et al., 2023, "BLIP-2: Bootstrapping Language-Image
Pre-training with Frozen Image Encoders and Large Language Models") <-> vlkit ``VisionLanguageModel`` with a Q-Former
bridge.

    pixel_values (I, 3, H, W) --vision_model (EVA-style ViT), last_hidden_state: every token, class token included,
        after post_layernorm--> (I, 1 + N, D_vis) --query_tokens + qformer (cross-attention to the image)--> (I, M, D_q)
        --language_projection--> (I, M, D_lm) --masked scatter at image_token_index--> language_model --> logits

transformers 5 expands ``num_query_tokens`` placeholders (``image_token_index``) in ``input_ids`` (its
``Blip2Processor`` puts them before the tokenized prompt, begin-of-text included) and fills them by masked scatter,
which is ``VisionLanguageModel``'s own contract. Checkpoints without ``image_token_index`` (configs written before
transformers placed the queries this way) are refused.

Key map (``vlkit`` <-> ``hf``):

- ``encoder.*`` <-> ``vision_model.*``: ``embeddings.class_embedding`` / ``position_embedding`` (1, 1 + N, D) /
  ``patch_embedding`` (biased) <-> ``class_token`` / ``pos_embed.weight`` / ``patch_embed.proj``; per layer
  ``layer_norm1``, ``self_attn.qkv`` (one fused weight and bias: EVA's separate q and v biases are saved with the
  zero k bias between them), ``self_attn.projection``, ``layer_norm2``, ``mlp.fc1`` / ``fc2`` <-> ``blocks.{i}``'s
  ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp``; ``post_layernorm`` <-> ``norm`` (vlkit's ViT with
  ``class_token``, no pre-norm, ``final_norm="tokens"``: the layout needs no option of its own).
- ``bridge.*`` <-> ``query_tokens``, ``qformer.*``, ``language_projection``: ``convert.blip2_qformer``'s map.
- ``lm.*`` <-> ``language_model.model.*`` and ``language_model.lm_head`` (absent when tied): ``convert.opt``'s map
  for an OPT LM, ``convert.llama``'s for Llama / Qwen2.

Options read: ``vision_config`` (sizes, ``hidden_act``, ``layer_norm_eps``, ``qkv_bias``), ``qformer_config`` (with
``num_query_tokens``; ``use_qformer_text_input`` must be false: the generation model keeps no text embeddings),
``text_config.model_type`` (``opt`` / ``llama`` / ``qwen2``) with that converter's options, ``tie_word_embeddings``
of the text config, and ``image_token_index`` (or ``image_token_id``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vlkit.bridges import QFormerConfig
from vlkit.convert import clip, llama, opt
from vlkit.convert.blip2_qformer import qformer_config_from_hf, qformer_config_to_hf, qformer_rules
from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    Rule,
    check_channels,
    linear,
    raise_if,
    rule,
    square_size,
    with_defaults,
)
from vlkit.convert.llama import WeightSource
from vlkit.convert.llava import _export_tensors, _rooted, read_vlm
from vlkit.encoders import ViTConfig
from vlkit.lm import LMConfig
from vlkit.models.vlm import VisionLanguageModel, VLMConfig

MODEL_TYPE = "blip-2"
ARCHITECTURES = ("Blip2ForConditionalGeneration",)

# Blip2VisionConfig's defaults (EVA ViT-g/14 at 224 px); config.json files omit fields left at their default.
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
    "num_channels": 3,
}  # fmt: skip
DEFAULT_QUERIES = 32
# The fixed EVA-style layout of BLIP-2's tower as ViTConfig fields.
_EVA_LAYOUT: dict[str, Any] = {"patch_bias": True, "class_token": True, "pre_norm": False, "final_norm": "tokens",
                               "pool": "cls"}  # fmt: skip
_LANGUAGE_MODELS = {"opt": opt, "llama": llama, "qwen2": llama}


# --- key map


def _vision_rules(config: ViTConfig) -> list[Rule]:
    v, h = "encoder", "vision_model"
    rules = [
        rule(f"{v}.class_token", f"{h}.embeddings.class_embedding"),
        *linear(f"{v}.patch_embed.proj", f"{h}.embeddings.patch_embedding"),
        rule(f"{v}.pos_embed.weight", f"{h}.embeddings.position_embedding"),
    ]
    for i in range(config.depth):
        vb, hb = f"{v}.blocks.{i}", f"{h}.encoder.layers.{i}"
        rules += linear(f"{vb}.norm1", f"{hb}.layer_norm1")
        rules += linear(f"{vb}.attn.qkv", f"{hb}.self_attn.qkv", bias=config.qkv_bias)
        rules += linear(f"{vb}.attn.proj", f"{hb}.self_attn.projection")
        rules += linear(f"{vb}.norm2", f"{hb}.layer_norm2")
        rules += linear(f"{vb}.mlp.fc1", f"{hb}.mlp.fc1")
        rules += linear(f"{vb}.mlp.fc2", f"{hb}.mlp.fc2")
    return [*rules, *linear(f"{v}.norm", f"{h}.post_layernorm")]


def _language_model(config: LMConfig) -> Any:
    """``convert.opt`` or ``convert.llama``: the module whose layout ``config`` is (OPT's learned positions)."""
    return opt if config.positions == "learned" else llama


def rules(config: VLMConfig) -> list[Rule]:
    """The full key map of a BLIP-2 model (vlkit keys <-> the saved layout)."""
    assert isinstance(config.vision, ViTConfig) and isinstance(config.bridge, QFormerConfig)
    bridge = qformer_rules(config.bridge, vlkit_prefix="bridge.")
    module = _language_model(config.lm)
    lm_rules = module.rules(config.lm, prefix="language_model.model" + (".decoder" if module is opt else ""))
    # Both LM maps name the untied head ``lm_head``; under BLIP-2 it is ``language_model.lm_head``.
    text = _rooted(lm_rules, ("", "lm."), ("", ""))
    text = [Rule(r.vlkit, tuple(f"language_model.{k}" if k.startswith("lm_head.") else k for k in r.hf), r.hf_shape)
            for r in text]  # fmt: skip
    return [*_vision_rules(config.vision), *bridge, *text]


def _fused_sizes(config: VLMConfig) -> dict[str, list[int]]:
    if _language_model(config.lm) is opt:
        return {}  # q, k and v of equal size: split in equal parts
    return {f"lm.{key}": sizes for key, sizes in llama.fused_sizes(config.lm).items()}


# --- config


def config_from_hf(hf: dict[str, Any], where: str) -> VLMConfig:
    """A BLIP-2 ``config.json`` dict -> ``VLMConfig`` (every option the converter reads is checked here)."""
    vision = with_defaults(dict(hf.get("vision_config") or {}), VISION_DEFAULTS)
    check_channels(vision, where)
    vit = clip.vision_tower(vision, where, square_size(vision["image_size"], "image_size", where),
                            square_size(vision["patch_size"], "patch_size", where), **_EVA_LAYOUT)  # fmt: skip
    vit = dataclasses.replace(vit, qkv_bias=bool(vision["qkv_bias"]))
    raw_qformer = dict(hf.get("qformer_config") or {})
    if raw_qformer.get("use_qformer_text_input"):
        raise ConversionError(
            f"{where}: qformer_config.use_qformer_text_input=true: Blip2ForConditionalGeneration then keeps the "
            "Q-Former's text feed-forward blocks but no text embeddings, which vlkit's Q-Former with text input needs"
        )
    qformer = qformer_config_from_hf(raw_qformer, hf.get("num_query_tokens", DEFAULT_QUERIES), f"{where} qformer")
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "opt")
    module = _LANGUAGE_MODELS.get(str(text["model_type"]))
    if module is None:
        raise ConversionError(f"{where}: text_config.model_type {text['model_type']!r} is not supported (BLIP-2 "
                              f"with a decoder-only LM); supported: {sorted(_LANGUAGE_MODELS)}")  # fmt: skip
    lm = module.config_from_hf(text, f"{where} text_config")
    image_token = hf.get("image_token_index")
    image_token = hf.get("image_token_id") if image_token is None else image_token  # transformers' alias
    if image_token is None:
        raise ConversionError(
            f"{where}: no image_token_index: this config predates transformers' image placeholders (the query outputs "
            "were prepended to the prompt's embeddings); vlkit fills placeholders, as transformers 5 does. Add the "
            "<image> token and image_token_index, as the current Salesforce/blip2-* configs have"
        )
    if not 0 <= int(image_token) < lm.vocab_size:
        raise ConversionError(f"{where}: image_token_index {image_token} is outside the vocabulary ({lm.vocab_size})")
    return VLMConfig(vision=vit, bridge=qformer, lm=lm, feature_layer=None, keep_class_token=True,
                     image_token_id=int(image_token), chat_template="plain")  # fmt: skip


# --- loading


def _check_architecture(hf: dict[str, Any], where: str) -> None:
    for name in hf.get("architectures") or []:
        if name not in ARCHITECTURES:
            raise ConversionError(f"{where}: architecture {name} is not supported for blip-2; supported: "
                                  f"{list(ARCHITECTURES)}")  # fmt: skip


def _load(hf: dict[str, Any], source: WeightSource, where: str, dtype: torch.dtype | None) -> VisionLanguageModel:
    _check_architecture(hf, where)
    config = config_from_hf(hf, where)
    if config.lm.tie_embeddings and llama.head_stored_apart(
        source, rules(config), "lm.token_embed.weight", "language_model.lm_head.weight"
    ):
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, tie_embeddings=False))
    ignored = {"language_model.lm_head.weight"} if config.lm.tie_embeddings else set()
    return read_vlm(config, rules(config), source, where, dtype, ignored, _fused_sizes(config))


def load_directory(directory: Path, hf: dict[str, Any], dtype: torch.dtype | None = None) -> VisionLanguageModel:
    return _load(hf, WeightSource.from_directory(directory), str(directory), dtype)


def load(checkpoint: HFCheckpoint, source: str) -> VisionLanguageModel:
    return _load(checkpoint.config, WeightSource(checkpoint.weights), source, None)


# --- export


def _problems(config: VLMConfig) -> list[str]:
    """Every option of a vlkit VLM that ``Blip2ForConditionalGeneration`` cannot express."""
    vision, bridge = config.vision, config.bridge
    if not isinstance(vision, ViTConfig):
        return [f"the image tower is {type(vision).__name__}; BLIP-2 needs a ViT"]
    # BLIP-2's attention may go without q/v biases, which CLIP's checks do not allow: checked with them on.
    problems = clip.vit_tower_problems(dataclasses.replace(vision, qkv_bias=True))
    for key, wanted in _EVA_LAYOUT.items():
        if getattr(vision, key) != wanted:
            problems.append(f"vision.{key}={getattr(vision, key)!r} (BLIP-2's tower has {wanted!r})")
    if config.feature_layer is not None or not config.keep_class_token:
        problems.append("BLIP-2's Q-Former reads the tower's normed output with the class token (feature_layer=None, "
                        f"keep_class_token=True), not feature_layer={config.feature_layer}, "
                        f"keep_class_token={config.keep_class_token}")  # fmt: skip
    if not isinstance(bridge, QFormerConfig):
        problems.append(f"bridge {type(bridge).__name__}: BLIP-2's bridge is the Q-Former")
    elif bridge.text_input:
        problems.append("bridge.text_input=True: Blip2ForConditionalGeneration keeps no Q-Former text embeddings "
                        "(stage-1 parts)")  # fmt: skip
    if config.embed_dim is not None:
        problems.append("embed_dim: the stage-1 heads (QFormerHeads) have no place in Blip2ForConditionalGeneration")
    if not (llama.matches(config.lm) or opt.matches(config.lm)):
        problems.append("the language model is neither an OPT nor a Llama / Qwen2 layout")
    if config.image_attention != "causal":
        problems.append(f"image_attention={config.image_attention!r} (BLIP-2's language model is causal throughout)")
    return problems


def matches(config: Any) -> bool:
    return isinstance(config, VLMConfig) and not _problems(config)


def export(model: VisionLanguageModel) -> HFCheckpoint:
    config = model.config
    raise_if(_problems(config), "BLIP-2 export")
    vision, bridge = config.vision, config.bridge
    assert isinstance(vision, ViTConfig) and isinstance(bridge, QFormerConfig)
    text = _language_model(config.lm).export(model.lm).config
    text.pop("architectures")
    hf = {
        "architectures": list(ARCHITECTURES),
        "model_type": MODEL_TYPE,
        "vision_config": {
            "model_type": "blip_2_vision_model",
            **clip.vit_tower_fields(vision, "BLIP-2 export"),
            "qkv_bias": vision.qkv_bias,
        },
        "qformer_config": qformer_config_to_hf(bridge, vision.dim),
        "text_config": text,
        "num_query_tokens": bridge.num_queries,
        "image_token_index": config.image_token_id,
        "use_decoder_only_language_model": True,
    }
    return HFCheckpoint(hf, _export_tensors(model, rules(config), _fused_sizes(config)))
