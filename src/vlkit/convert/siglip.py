"""Hugging Face ``SiglipModel`` (Zhai et al., 2023) <-> vlkit ``DualEncoder`` with the sigmoid loss.

Image tower: conv patch embedding with bias, learned positions, no class token, ``post_layernorm`` on every token,
then the "MAP" attention-pooling head. transformers builds that head on ``nn.MultiheadAttention``, whose fused
``in_proj_weight`` stacks q, k and v: its first third is vlkit's ``AttentionPool.attn.q`` and the rest its fused
``kv``. The image embedding is the pooled vector itself (no projection). Text tower: bidirectional, pooled at the
last position, followed by a biased linear ``head`` (vlkit's ``text_projection``). ``logit_scale`` and
``logit_bias`` are stored with shape (1,).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlkit.convert.clip import (
    export_dual_encoder_weights,
    image_tower_export_problems,
    sub_config,
    text_rules,
    text_tower,
    text_tower_fields,
    text_tower_problems,
    vit_tower_fields,
)
from vlkit.convert.clip import (
    vision_tower as clip_vision_tower,
)
from vlkit.convert.common import (
    ConversionError,
    HFCheckpoint,
    Rule,
    check_channels,
    clip_style_blocks,
    linear,
    load_weights,
    logit_scale_limit,
    pop_position_ids,
    raise_if,
    rule,
    square_size,
)
from vlkit.encoders import ViTConfig
from vlkit.models import DualEncoder, DualEncoderConfig

MODEL_TYPE = "siglip"
ARCHITECTURES = ("SiglipModel",)

# transformers' SiglipTextConfig / SiglipVisionConfig defaults (config.json files omit defaults).
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407, "projection_size": None,
}  # fmt: skip
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "vision_use_head": True,
}  # fmt: skip


def _vision_rules(config: ViTConfig) -> list[Rule]:
    v, h = "image_encoder", "vision_model"
    num_positions = config.grid[0] * config.grid[1]
    head = f"{h}.head"
    return [
        *linear(f"{v}.patch_embed.proj", f"{h}.embeddings.patch_embedding"),
        rule(f"{v}.pos_embed.weight", f"{h}.embeddings.position_embedding.weight", (num_positions, config.dim)),
        *clip_style_blocks(f"{v}.blocks", f"{h}.encoder.layers", config.depth),
        *linear(f"{v}.norm", f"{h}.post_layernorm"),
        rule(f"{v}.head.probe", f"{head}.probe"),
        rule((f"{v}.head.attn.q.weight", f"{v}.head.attn.kv.weight"), f"{head}.attention.in_proj_weight"),
        rule((f"{v}.head.attn.q.bias", f"{v}.head.attn.kv.bias"), f"{head}.attention.in_proj_bias"),
        *linear(f"{v}.head.attn.proj", f"{head}.attention.out_proj"),
        *linear(f"{v}.head.norm", f"{head}.layernorm"),
        *linear(f"{v}.head.mlp.fc1", f"{head}.mlp.fc1"),
        *linear(f"{v}.head.mlp.fc2", f"{head}.mlp.fc2"),
    ]


def vision_tower(vision: dict[str, Any], source: str, image_size: int, patch_size: int, **changes: Any) -> ViTConfig:
    """SigLIP's (and SigLIP 2's) image tower: no class token, final norm on every token, a MAP head."""
    layout = {"patch_bias": True, "class_token": False, "pre_norm": False, "final_norm": "tokens", "pool": "map"}
    return clip_vision_tower(vision, source, image_size, patch_size, **{**layout, **changes})


def shared_embed_dim(vision: dict[str, Any], text: dict[str, Any], source: str) -> int:
    """The embedding width: SigLIP's image embedding is the unprojected pooled vector, so the text head must
    project to the vision width."""
    if not vision["vision_use_head"]:
        raise ConversionError(f"{source}: vision_use_head=False leaves the model without image embeddings")
    dim = int(vision["hidden_size"])
    embed_dim = int(text["projection_size"] or text["hidden_size"])
    if embed_dim != dim:
        raise ConversionError(
            f"{source}: text projection_size {embed_dim} differs from the vision width {dim}; SigLIP's image "
            "embedding is the unprojected pooled vector, so both must be equal"
        )
    return embed_dim


def dual_encoder_config(
    vision: ViTConfig, text: dict[str, Any], embed_dim: int, weights: dict[str, torch.Tensor], source: str
) -> DualEncoderConfig:
    """SigLIP's (and SigLIP 2's) dual encoder around a converted image tower: no image projection, a biased linear
    text head, the sigmoid loss, and the checkpoint's own clamp on the logit scale."""
    return DualEncoderConfig(
        vision=vision,
        text=text_tower(text, source, causal=False, pool="last"),
        embed_dim=embed_dim,
        image_projection="none",
        text_projection="linear",
        projection_bias=True,
        logit_scale_init=math.log(10.0),
        logit_bias_init=-10.0,
        max_logit_scale=logit_scale_limit(weights, "logit_scale", DualEncoderConfig.max_logit_scale),
        loss="siglip",
    )


def rules(config: DualEncoderConfig) -> list[Rule]:
    assert isinstance(config.vision, ViTConfig)
    return [
        *_vision_rules(config.vision),
        *text_rules(config.text),
        *linear("text_projection", "text_model.head"),
        rule("logit_scale", "logit_scale", (1,)),
        rule("logit_bias", "logit_bias", (1,)),
    ]


def load(checkpoint: HFCheckpoint, source: str) -> DualEncoder:
    raw = checkpoint.config
    text = sub_config(raw, "text_config", TEXT_DEFAULTS)
    vision = sub_config(raw, "vision_config", VISION_DEFAULTS)
    check_channels(vision, source)
    vision_config = vision_tower(
        vision,
        source,
        image_size=square_size(vision["image_size"], "image_size", source),
        patch_size=square_size(vision["patch_size"], "patch_size", source),
    )
    embed_dim = shared_embed_dim(vision, text, source)
    weights = dict(checkpoint.weights)
    config = dual_encoder_config(vision_config, text, embed_dim, weights, source)
    pop_position_ids(weights, "text_model.embeddings.position_ids", config.text.max_seq_len, source)
    pop_position_ids(weights, "vision_model.embeddings.position_ids", vision_config.grid[0] ** 2, source)
    model = DualEncoder(config)
    load_weights(model, rules(config), weights, source)
    return model


def matches(config: DualEncoderConfig) -> bool:
    return isinstance(config.vision, ViTConfig) and config.vision.pool == "map"


def export(model: DualEncoder) -> HFCheckpoint:
    config = model.config
    vision, text = config.vision, config.text
    where = "SigLIP export"
    wanted = {"class_token": False, "pre_norm": False, "final_norm": "tokens", "pool": "map", "patch_bias": True}
    problems = image_tower_export_problems(vision, "SigLIP", "SiglipModel", wanted)
    problems += text_tower_problems(text, causal=False, pools=("last",))
    if config.image_projection != "none" or config.text_projection != "linear" or not config.projection_bias:
        problems.append("SigLIP has no image projection and a biased linear text head")
    if config.logit_bias_init is None:
        problems.append("SigLIP needs a logit_bias")
    raise_if(problems, where)
    weights = export_dual_encoder_weights(model, rules(config))
    hf_config = {
        "architectures": list(ARCHITECTURES),
        "model_type": MODEL_TYPE,
        "text_config": {
            "model_type": "siglip_text_model",
            **text_tower_fields(text, where),
            "projection_size": config.embed_dim,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            **vit_tower_fields(vision, where),
            "vision_use_head": True,
        },
    }
    return HFCheckpoint(hf_config, weights)
