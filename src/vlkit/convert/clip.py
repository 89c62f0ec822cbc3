"""Hugging Face ``CLIPModel`` (Radford et al., 2021) <-> vlkit ``DualEncoder``.

Image tower: conv patch embedding without bias, class embedding, learned positions, ``pre_layrnorm``, pre-norm
layers, ``post_layernorm`` on the pooled class token only. Text tower: causal, pooled at the end-of-text token:
with the legacy ``eos_token_id == 2`` of older configs (transformers' CLIPTextTransformer) the pooled position is
the argmax of the ids (the EOT token has the largest id in OpenAI's vocabulary), otherwise the first position of
``eos_token_id``. Both towers are projected without bias; ``logit_scale`` is a scalar log-temperature.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    Rule,
    activation_from_hf,
    activation_to_hf,
    check_channels,
    clip_style_blocks,
    export_weights,
    linear,
    load_weights,
    logit_scale_limit,
    pop_position_ids,
    raise_if,
    rule,
    square_size,
    with_defaults,
)
from vlkit.encoders import ViTConfig
from vlkit.models import DualEncoder, DualEncoderConfig
from vlkit.text import TextConfig

MODEL_TYPE = "clip"
ARCHITECTURES = ("CLIPModel",)
LEGACY_EOS = 2  # transformers keeps argmax pooling for configs written before its PR #24773

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (config.json files omit defaults).
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
}  # fmt: skip
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
MODEL_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}


def sub_config(config: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``text_config`` / ``vision_config`` with defaults; the legacy ``*_config_dict`` overrides, as in transformers."""
    merged = {**(config.get(name) or {}), **(config.get(f"{name}_dict") or {})}
    return with_defaults(merged, defaults)


def vision_tower(vision: dict[str, Any], where: str, image_size: int, patch_size: int, **layout: Any) -> ViTConfig:
    """A HF CLIP-family ``vision_config`` as a ``ViTConfig``: the sizes every such tower has, plus the family's
    ``layout`` (class token, norms, pooling, position policy)."""
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        dim=int(vision["hidden_size"]),
        depth=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        mlp_dim=int(vision["intermediate_size"]),
        act=activation_from_hf(vision["hidden_act"], f"{where} vision_config"),  # type: ignore[arg-type]
        norm_eps=float(vision["layer_norm_eps"]),
        qkv_bias=True,
        **layout,
    )


def text_tower(text: dict[str, Any], where: str, causal: bool, pool: str) -> TextConfig:
    return TextConfig(
        vocab_size=int(text["vocab_size"]),
        max_seq_len=int(text["max_position_embeddings"]),
        dim=int(text["hidden_size"]),
        depth=int(text["num_hidden_layers"]),
        num_heads=int(text["num_attention_heads"]),
        mlp_dim=int(text["intermediate_size"]),
        act=activation_from_hf(text["hidden_act"], f"{where} text_config"),  # type: ignore[arg-type]
        norm_eps=float(text["layer_norm_eps"]),
        causal=causal,
        pool=pool,  # type: ignore[arg-type]
        eos_token_id=_single_id(text["eos_token_id"], f"{where} text_config.eos_token_id"),
        pad_token_id=_single_id(text["pad_token_id"], f"{where} text_config.pad_token_id"),
    )


def _single_id(value: Any, where: str) -> int:
    if isinstance(value, list):
        if len(value) != 1:
            raise ConversionError(f"{where}={value}: vlkit's text tower takes one end-of-text id")
        value = value[0]
    return int(value)


def text_rules(config: TextConfig) -> list[Rule]:
    """vlkit ``TextTransformer`` <-> the text model CLIP and SigLIP share (without SigLIP's head)."""
    t, h = "text_encoder", "text_model"
    return [
        rule(f"{t}.token_embed.weight", f"{h}.embeddings.token_embedding.weight"),
        rule(f"{t}.pos_embed", f"{h}.embeddings.position_embedding.weight", (config.max_seq_len, config.dim)),
        *clip_style_blocks(f"{t}.blocks", f"{h}.encoder.layers", config.depth),
        *linear(f"{t}.norm", f"{h}.final_layer_norm"),
    ]


def _vision_rules(config: ViTConfig) -> list[Rule]:
    v, h = "image_encoder", "vision_model"
    num_positions = config.grid[0] * config.grid[1] + 1
    return [
        rule(f"{v}.class_token", f"{h}.embeddings.class_embedding", (config.dim,)),
        rule(f"{v}.patch_embed.proj.weight", f"{h}.embeddings.patch_embedding.weight"),
        rule(f"{v}.pos_embed.weight", f"{h}.embeddings.position_embedding.weight", (num_positions, config.dim)),
        *linear(f"{v}.norm_pre", f"{h}.pre_layrnorm"),
        *clip_style_blocks(f"{v}.blocks", f"{h}.encoder.layers", config.depth),
        *linear(f"{v}.norm", f"{h}.post_layernorm"),
    ]


def _rules(config: DualEncoderConfig) -> list[Rule]:
    assert isinstance(config.vision, ViTConfig)
    return [
        *_vision_rules(config.vision),
        *text_rules(config.text),
        rule("image_projection.weight", "visual_projection.weight"),
        rule("text_projection.weight", "text_projection.weight"),
        rule("logit_scale", "logit_scale"),
    ]


def load(checkpoint: HFCheckpoint, source: str) -> DualEncoder:
    raw = checkpoint.config
    text = sub_config(raw, "text_config", TEXT_DEFAULTS)
    vision = sub_config(raw, "vision_config", VISION_DEFAULTS)
    top = with_defaults(raw, MODEL_DEFAULTS)
    check_channels(vision, source)
    vision_config = vision_tower(
        vision, source, image_size=square_size(vision["image_size"], "image_size", source),
        patch_size=square_size(vision["patch_size"], "patch_size", source),
        patch_bias=False, class_token=True, pre_norm=True, final_norm="pooled", pool="cls",
    )  # fmt: skip
    pool = "argmax" if _single_id(text["eos_token_id"], source) == LEGACY_EOS else "eos"
    config = DualEncoderConfig(
        vision=vision_config,
        text=text_tower(text, source, causal=True, pool=pool),
        embed_dim=int(top["projection_dim"]),
        projection_bias=False,
        logit_scale_init=float(top["logit_scale_init_value"]),
        max_logit_scale=logit_scale_limit(checkpoint.weights, "logit_scale", DualEncoderConfig.max_logit_scale),
        loss="clip",
    )
    weights = dict(checkpoint.weights)
    pop_position_ids(weights, "text_model.embeddings.position_ids", config.text.max_seq_len, source)
    pop_position_ids(weights, "vision_model.embeddings.position_ids", vision_config.grid[0] ** 2 + 1, source)
    model = DualEncoder(config)
    load_weights(model, _rules(config), weights, source)
    return model


def matches(config: DualEncoderConfig) -> bool:
    return isinstance(config.vision, ViTConfig) and config.vision.pool == "cls"


def export(model: DualEncoder) -> HFCheckpoint:
    config = model.config
    vision, text = config.vision, config.text
    where = "CLIP export"
    wanted = {"class_token": True, "pre_norm": True, "final_norm": "pooled", "pool": "cls", "patch_bias": False}
    problems = image_tower_export_problems(vision, "CLIP", "CLIPModel", wanted)
    problems += text_tower_problems(text, causal=True, pools=("argmax", "eos"))
    if text.pool == "eos" and text.eos_token_id == LEGACY_EOS:
        problems.append("text.pool='eos' with eos_token_id=2, which transformers reads as legacy argmax pooling")
    if config.image_projection != "linear" or config.text_projection != "linear" or config.projection_bias:
        problems.append("CLIP projects both towers with bias-free linear layers")
    if config.logit_bias_init is not None:
        problems.append("CLIP has no logit_bias (a sigmoid-loss model exports as SigLIP)")
    raise_if(problems, where)
    weights = export_dual_encoder_weights(model, _rules(config))
    hf_config = {
        "architectures": list(ARCHITECTURES),
        "model_type": MODEL_TYPE,
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "text_config": {
            "model_type": "clip_text_model",
            **text_tower_fields(text, where),
            "eos_token_id": LEGACY_EOS if text.pool == "argmax" else text.eos_token_id,
            "projection_dim": config.embed_dim,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            **vit_tower_fields(vision, where),
            "projection_dim": config.embed_dim,
        },
    }
    return HFCheckpoint(hf_config, weights)


def image_tower_export_problems(vision: object, family: str, hf_class: str, wanted: dict[str, object]) -> list[str]:
    """What stops a dual encoder's image tower from exporting as ``family``: not a ViT is fatal at once; otherwise
    every option that differs from the family's fixed architecture (``wanted``) or that HF cannot express."""
    if not isinstance(vision, ViTConfig):
        raise ConversionError(f"{family} export: the image tower is {type(vision).__name__}; HF {hf_class} needs a ViT")
    problems = vit_tower_problems(vision)
    problems += [
        f"vision.{k}={getattr(vision, k)!r} ({family} has {v!r})" for k, v in wanted.items() if getattr(vision, k) != v
    ]
    return problems


def export_dual_encoder_weights(model: DualEncoder, rules: list[Rule]) -> dict[str, torch.Tensor]:
    weights = export_weights(model, rules)
    # vlkit clamps the scale at max_logit_scale and transformers does not: export the value vlkit actually uses.
    weights["logit_scale"] = weights["logit_scale"].clamp(max=math.log(model.config.max_logit_scale))
    return weights


def vit_tower_problems(vision: ViTConfig) -> list[str]:
    """Options of a vlkit ViT that no CLIP/SigLIP vision tower has."""
    problems = []
    if isinstance(vision.image_size, tuple) and vision.image_size[0] != vision.image_size[1]:
        problems.append(f"vision.image_size={vision.image_size} is not square")
    if vision.norm != "layernorm" or vision.layer_scale is not None or vision.pos_embed != "learned":
        problems.append("vision tower needs layernorm, learned positions and no layer scale")
    if vision.stem != "patch":
        problems.append(f"vision.stem={vision.stem!r} (HF vision towers patchify with one convolution)")
    if not vision.qkv_bias:
        problems.append("vision.qkv_bias=False (CLIP/SigLIP attention always has biases)")
    if vision.act not in ("gelu", "gelu_tanh", "quick_gelu", "relu"):
        problems.append(f"vision.act={vision.act!r}")
    return problems


def text_tower_problems(text: TextConfig, causal: bool, pools: tuple[str, ...]) -> list[str]:
    problems = []
    if text.causal != causal:
        problems.append(f"text.causal={text.causal} (the format's text tower has causal={causal})")
    if text.pool not in pools:
        problems.append(f"text.pool={text.pool!r} (the format pools with {' or '.join(pools)})")
    if text.act == "swiglu":
        problems.append("text.act='swiglu'")
    return problems


def vit_tower_fields(vision: ViTConfig, where: str) -> dict[str, Any]:
    return {
        "hidden_size": vision.dim,
        "intermediate_size": vision.mlp_dim,
        "num_hidden_layers": vision.depth,
        "num_attention_heads": vision.num_heads,
        "num_channels": 3,
        "image_size": vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0],
        "patch_size": vision.patch_size,
        "hidden_act": activation_to_hf(vision.act, where),
        "layer_norm_eps": vision.norm_eps,
    }


def text_tower_fields(text: TextConfig, where: str) -> dict[str, Any]:
    return {
        "vocab_size": text.vocab_size,
        "hidden_size": text.dim,
        "intermediate_size": text.mlp_dim,
        "num_hidden_layers": text.depth,
        "num_attention_heads": text.num_heads,
        "max_position_embeddings": text.max_seq_len,
        "hidden_act": activation_to_hf(text.act, where),
        "layer_norm_eps": text.norm_eps,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
    }
