"""Hugging Face ``Siglip2Model`` (SigLIP 2 NaFlex, Tschannen et al., 2025) <-> vlkit ``DualEncoder``.

The towers and heads are SigLIP's with the same key names (``vlkit.convert.siglip``), with two differences in the
image tower. Patches arrive already cut out and flattened (row, col, channel), so the patch embedding is a Linear
(D, p*p*3); vlkit keeps its conv layout (D, 3, p, p) and this module permutes between the two. The learned position
table is a square ``sqrt(num_patches)`` grid that is resized to every image's own grid with antialiased bilinear
interpolation (``ViTConfig.pos_embed_interpolation="bilinear_antialias"``); vlkit's ``image_size`` is that grid
times the patch size. NaFlex inputs (``pixel_values`` (B, L, p*p*3), ``pixel_attention_mask``, ``spatial_shapes``)
go to ``DualEncoder.encode_image`` as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlkit.convert import siglip
from vlkit.convert.clip import (
    export_dual_encoder_weights,
    image_tower_export_problems,
    sub_config,
    text_tower_fields,
    text_tower_problems,
    vit_tower_fields,
)
from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    check_channels,
    load_weights,
    pop_position_ids,
    raise_if,
)
from vlkit.encoders import ViTConfig
from vlkit.models import DualEncoder, DualEncoderConfig

MODEL_TYPE = "siglip2"
ARCHITECTURES = ("Siglip2Model",)
PATCH_WEIGHT = "vision_model.embeddings.patch_embedding.weight"

# transformers' Siglip2TextConfig / Siglip2VisionConfig defaults (config.json files omit defaults).
TEXT_DEFAULTS: dict[str, Any] = {**siglip.TEXT_DEFAULTS}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "num_patches": 256, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "vision_use_head": True,
}  # fmt: skip


def _grid_side(num_patches: int, source: str) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConversionError(f"{source}: vision_config.num_patches={num_patches} is not a square number; the "
                              "position table must be a square grid")  # fmt: skip
    return side


def vision_tower(vision: dict[str, Any], source: str) -> ViTConfig:
    """SigLIP's tower with NaFlex positions: the learned table of a square ``num_patches`` grid, resized per image."""
    patch_size = int(vision["patch_size"][0] if isinstance(vision["patch_size"], list) else vision["patch_size"])
    return siglip.vision_tower(
        vision, source, image_size=_grid_side(int(vision["num_patches"]), source) * patch_size,
        patch_size=patch_size, pos_embed="learned", pos_embed_interpolation="bilinear_antialias",
    )  # fmt: skip


def load(checkpoint: HFCheckpoint, source: str) -> DualEncoder:
    raw = checkpoint.config
    text = sub_config(raw, "text_config", TEXT_DEFAULTS)
    vision = sub_config(raw, "vision_config", VISION_DEFAULTS)
    check_channels(vision, source)
    if isinstance(vision["patch_size"], list) and len(set(vision["patch_size"])) != 1:
        raise ConversionError(f"{source}: patch_size={vision['patch_size']} is not square")
    vision_config = vision_tower(vision, source)
    embed_dim = siglip.shared_embed_dim(vision, text, source)
    weights = dict(checkpoint.weights)
    config = siglip.dual_encoder_config(vision_config, text, embed_dim, weights, source)
    pop_position_ids(weights, "text_model.embeddings.position_ids", config.text.max_seq_len, source)
    _patch_weight_to_conv(weights, vision_config, source)
    model = DualEncoder(config)
    load_weights(model, siglip.rules(config), weights, source)  # the same key names as SigLIP
    return model


def _patch_weight_to_conv(weights: dict[str, torch.Tensor], vision: ViTConfig, source: str) -> None:
    """In place: the Linear patch weight (D, p*p*3), inputs ordered (row, col, channel) -> vlkit's (D, 3, p, p)."""
    if PATCH_WEIGHT not in weights:
        return  # load_weights names the missing key
    weight = weights[PATCH_WEIGHT]
    p = vision.patch_size
    if tuple(weight.shape) != (vision.dim, p * p * 3):
        raise ConversionError(f"{source}: {PATCH_WEIGHT} has shape {tuple(weight.shape)}, expected "
                              f"{(vision.dim, p * p * 3)}")  # fmt: skip
    weights[PATCH_WEIGHT] = weight.reshape(vision.dim, p, p, 3).permute(0, 3, 1, 2).contiguous()


def matches(config: DualEncoderConfig) -> bool:
    vision = config.vision
    return isinstance(vision, ViTConfig) and vision.pool == "map" and vision.pos_embed_interpolation != "bicubic"


def export(model: DualEncoder) -> HFCheckpoint:
    config = model.config
    vision, text = config.vision, config.text
    where = "SigLIP 2 export"
    wanted = {"class_token": False, "pre_norm": False, "final_norm": "tokens", "pool": "map", "patch_bias": True,
              "pos_embed_interpolation": "bilinear_antialias"}  # fmt: skip
    problems = image_tower_export_problems(vision, "SigLIP 2", "Siglip2Model", wanted)
    assert isinstance(vision, ViTConfig)
    if vision.grid[0] != vision.grid[1] or vision.image_size != vision.grid[0] * vision.patch_size:
        problems.append(f"vision.image_size={vision.image_size} is not a whole square grid of patches")
    problems += text_tower_problems(text, causal=False, pools=("last",))
    if config.image_projection != "none" or config.text_projection != "linear" or not config.projection_bias:
        problems.append("SigLIP 2 has no image projection and a biased linear text head")
    if config.logit_bias_init is None:
        problems.append("SigLIP 2 needs a logit_bias")
    raise_if(problems, where)
    weights = export_dual_encoder_weights(model, siglip.rules(config))
    weights[PATCH_WEIGHT] = weights[PATCH_WEIGHT].permute(0, 2, 3, 1).reshape(vision.dim, -1).contiguous()
    vision_fields = vit_tower_fields(vision, where)
    del vision_fields["image_size"]
    hf_config = {
        "architectures": list(ARCHITECTURES),
        "model_type": MODEL_TYPE,
        "text_config": {
            "model_type": "siglip2_text_model",
            **text_tower_fields(text, where),
            "projection_size": config.embed_dim,
        },
        "vision_config": {
            "model_type": "siglip2_vision_model",
            **vision_fields,
            "num_patches": vision.grid[0] * vision.grid[1],
            "vision_use_head": True,
        },
    }
    return HFCheckpoint(hf_config, weights)
