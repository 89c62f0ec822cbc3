"""SigLIP presets (Zhai et al., 2023), SigLIP 2 NaFlex (Tschannen et al., 2025), and tiny test models, among them
NaViT's (Dehghani et al., 2023), which packs native aspect ratios into SigLIP's towers.

SigLIP: no class token, a MAP head, tanh-GELU, a bidirectional text tower pooled at the last position with a biased
linear head; logits start at scale 10 and bias -10.
"""

from __future__ import annotations

import math

from vlkit.encoders import ViTConfig
from vlkit.models.dual_encoder import DualEncoderConfig
from vlkit.registry import register_preset
from vlkit.text import TextConfig


def _siglip(image_size: int, patch_size: int, dim: int, depth: int, num_heads: int, mlp_dim: int) -> DualEncoderConfig:
    vision = ViTConfig(
        image_size=image_size, patch_size=patch_size, dim=dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
        act="gelu_tanh", norm_eps=1e-6, class_token=False, final_norm="tokens", pool="map",
    )  # fmt: skip
    text = TextConfig(
        vocab_size=32000, max_seq_len=64, dim=dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
        act="gelu_tanh", norm_eps=1e-6, causal=False, pool="last", eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return DualEncoderConfig(
        vision=vision, text=text, embed_dim=dim, image_projection="none", text_projection="linear",
        projection_bias=True, logit_scale_init=math.log(10.0), logit_bias_init=-10.0, loss="siglip",
    )  # fmt: skip


@register_preset
def siglip_base_patch16_224() -> DualEncoderConfig:
    return _siglip(224, 16, 768, 12, 12, 3072)


@register_preset
def siglip_so400m_patch14_384() -> DualEncoderConfig:
    return _siglip(384, 14, 1152, 27, 16, 4304)


@register_preset
def test_siglip() -> DualEncoderConfig:
    return _siglip(32, 8, 32, 2, 2, 64).replace(text=TextConfig(
        vocab_size=100, max_seq_len=16, dim=32, depth=2, num_heads=2, mlp_dim=64, act="gelu_tanh", norm_eps=1e-6,
        causal=False, pool="last",
    ))  # fmt: skip


# --- SigLIP 2 NaFlex (Tschannen et al., 2025): SigLIP's towers; patches at each image's native aspect ratio within a
# token budget, the learned 16x16 position table resized per image with antialiased bilinear interpolation. The text
# tower reads Gemma's 256k-token vocabulary (pad 0, eos 1).


def _siglip2_naflex(vision: ViTConfig) -> ViTConfig:
    return vision.replace(pos_embed_interpolation="bilinear_antialias")


@register_preset
def siglip2_base_patch16_naflex() -> DualEncoderConfig:
    config = _siglip(256, 16, 768, 12, 12, 3072)
    return config.replace(
        vision=_siglip2_naflex(config.vision), text=config.text.replace(vocab_size=256000, pad_token_id=0)
    )


@register_preset
def test_siglip2() -> DualEncoderConfig:
    config = test_siglip()
    return config.replace(vision=_siglip2_naflex(config.vision))


# --- NaViT (Dehghani et al., 2023): native aspect ratio, patch n' pack, factorised x/y position embeddings, masked
# pooling per image and the sigmoid loss. ``max_grid`` bounds the rows/columns of any image's patch grid.


@register_preset
def test_navit() -> DualEncoderConfig:
    config = test_siglip()
    vision = config.vision.replace(pos_embed="factorized", max_grid=8, patch_dropout=0.25)
    return config.replace(vision=vision)
