"""CLIP presets (Radford et al., 2021): OpenAI's ViT-B/32, B/16, L/14 and L/14@336, and tiny test models, among
them FILIP's (Yao et al., 2021): CLIP's dual encoder with token-wise late interaction and its loss.

OpenAI's towers use QuickGELU, no patch bias, ln_pre, and a norm on the pooled class token only; the text tower is
causal and pooled at the end-of-text token (legacy argmax of the ids).
"""

from __future__ import annotations

import math

from vlkit.encoders import ConvNeXtConfig, ViTConfig
from vlkit.models.dual_encoder import DualEncoderConfig
from vlkit.registry import register_preset
from vlkit.text import TextConfig


def _clip_vision(patch_size: int, dim: int, depth: int, num_heads: int, image_size: int = 224) -> ViTConfig:
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=4 * dim,
        act="quick_gelu",
        norm_eps=1e-5,
        patch_bias=False,
        pre_norm=True,
        final_norm="pooled",
        pool="cls",
    )


def _clip_text(dim: int, depth: int, num_heads: int) -> TextConfig:
    return TextConfig(
        vocab_size=49408, max_seq_len=77, dim=dim, depth=depth, num_heads=num_heads, mlp_dim=4 * dim,
        act="quick_gelu", norm_eps=1e-5, causal=True, pool="argmax", eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip


def _clip(vision: ViTConfig, text: TextConfig, embed_dim: int) -> DualEncoderConfig:
    return DualEncoderConfig(vision=vision, text=text, embed_dim=embed_dim, logit_scale_init=math.log(1 / 0.07))


@register_preset
def clip_vit_base_patch32() -> DualEncoderConfig:
    return _clip(_clip_vision(32, 768, 12, 12), _clip_text(512, 12, 8), 512)


@register_preset
def clip_vit_base_patch16() -> DualEncoderConfig:
    return _clip(_clip_vision(16, 768, 12, 12), _clip_text(512, 12, 8), 512)


@register_preset
def clip_vit_large_patch14() -> DualEncoderConfig:
    return _clip(_clip_vision(14, 1024, 24, 16), _clip_text(768, 12, 12), 768)


@register_preset
def clip_vit_large_patch14_336() -> DualEncoderConfig:
    return _clip(_clip_vision(14, 1024, 24, 16, image_size=336), _clip_text(768, 12, 12), 768)


# --- Tiny models for tests: every option path at a size that runs in milliseconds.


@register_preset
def test_clip() -> DualEncoderConfig:
    vision = _clip_vision(8, 32, 2, 2, image_size=32).replace(mlp_dim=64)
    text = TextConfig(vocab_size=100, max_seq_len=16, dim=32, depth=2, num_heads=2, mlp_dim=64, eos_token_id=2)
    return DualEncoderConfig(vision=vision, text=text, embed_dim=24)


@register_preset
def test_filip() -> DualEncoderConfig:
    # FILIP (Yao et al., 2021): token-wise late interaction. Mean pooling and no class token, so every parameter
    # feeds the patch tokens the loss scores (and the pooled features kept for compatibility).
    vision = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=64, class_token=False,
                       pool="mean", final_norm="tokens")  # fmt: skip
    text = TextConfig(vocab_size=100, max_seq_len=16, dim=32, depth=2, num_heads=2, mlp_dim=64, eos_token_id=2)
    return DualEncoderConfig(vision=vision, text=text, embed_dim=24, loss="filip", interaction="token")


@register_preset
def test_convnext_clip() -> DualEncoderConfig:
    vision = ConvNeXtConfig(image_size=32, depths=(1, 1), dims=(16, 32), patch_size=4)
    text = TextConfig(vocab_size=100, max_seq_len=16, dim=32, depth=1, num_heads=2, mlp_dim=64, eos_token_id=2)
    return DualEncoderConfig(vision=vision, text=text, embed_dim=24)
