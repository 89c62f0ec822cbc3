"""Named presets: the exact public architectures, tiny ``test_*`` models, and the small ShapesWorld models.

Real-size presets mirror the published configs of their checkpoints (parameter names aside, shapes and counts
match: see tests/test_presets.py).
"""

from __future__ import annotations

import math

from vlkit.encoders import ConvNeXtConfig, ViTConfig
from vlkit.models.classifier import ImageClassifierConfig
from vlkit.models.dual_encoder import DualEncoderConfig
from vlkit.registry import register_preset
from vlkit.text import TextConfig

# --- CLIP (Radford et al., 2021): OpenAI's towers use QuickGELU, no patch bias, ln_pre, and a norm on the pooled
# class token only; the text tower is causal and pooled at the end-of-text token (legacy argmax of the ids).


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


# --- SigLIP (Zhai et al., 2023): no class token, a MAP head, tanh-GELU, a bidirectional text tower pooled at the
# last position with a biased linear head; logits start at scale 10 and bias -10.


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


# --- Image classifiers (ImageNet-1k heads).


@register_preset
def vit_base_patch16_224() -> ImageClassifierConfig:
    vision = ViTConfig(image_size=224, patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072, norm_eps=1e-12)
    return ImageClassifierConfig(vision=vision, num_classes=1000)


@register_preset
def convnext_tiny() -> ImageClassifierConfig:
    return ImageClassifierConfig(vision=ConvNeXtConfig(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), num_classes=1000)


@register_preset
def convnext_base() -> ImageClassifierConfig:
    return ImageClassifierConfig(
        vision=ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), num_classes=1000
    )


# --- Tiny models for tests: every option path at a size that runs in milliseconds.


@register_preset
def test_clip() -> DualEncoderConfig:
    vision = _clip_vision(8, 32, 2, 2, image_size=32).replace(mlp_dim=64)
    text = TextConfig(vocab_size=100, max_seq_len=16, dim=32, depth=2, num_heads=2, mlp_dim=64, eos_token_id=2)
    return DualEncoderConfig(vision=vision, text=text, embed_dim=24)


@register_preset
def test_siglip() -> DualEncoderConfig:
    return _siglip(32, 8, 32, 2, 2, 64).replace(text=TextConfig(
        vocab_size=100, max_seq_len=16, dim=32, depth=2, num_heads=2, mlp_dim=64, act="gelu_tanh", norm_eps=1e-6,
        causal=False, pool="last",
    ))  # fmt: skip


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


@register_preset
def test_vit() -> ImageClassifierConfig:
    vision = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=64, pool="mean")
    return ImageClassifierConfig(vision=vision, num_classes=10)


@register_preset
def test_convnext() -> ImageClassifierConfig:
    vision = ConvNeXtConfig(image_size=32, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), drop_path=0.1)
    return ImageClassifierConfig(vision=vision, num_classes=10)


# --- ShapesWorld models: sized so a recipe trains in minutes on a laptop CPU (64x64 images, 8x8 patches). Plain
# erf-GELU rather than SigLIP's tanh-GELU: these are trained from scratch, and tanh-GELU is 3x slower on CPU.
# An overlapping conv stem instead of the one-convolution patchify: a supervised shape probe with this tower reaches
# 98% after 200 steps with it and 82% without (Xiao et al., 2021, "Early convolutions help transformers see better").


def _shapes_vision(**changes: object) -> ViTConfig:
    base = ViTConfig(image_size=64, patch_size=8, dim=128, depth=4, num_heads=4, mlp_dim=512, class_token=False,
                     pool="mean", final_norm="tokens", act="gelu", stem="conv", stem_widths=(32, 64))  # fmt: skip
    return base.replace(**changes)


def _shapes_text(**changes: object) -> TextConfig:
    base = TextConfig(vocab_size=1024, max_seq_len=32, dim=128, depth=2, num_heads=4, mlp_dim=512, act="gelu",
                      causal=True, pool="eos", eos_token_id=2, pad_token_id=0)  # fmt: skip
    return base.replace(**changes)


@register_preset
def shapes_clip() -> DualEncoderConfig:
    return DualEncoderConfig(vision=_shapes_vision(), text=_shapes_text(), embed_dim=128)


@register_preset
def shapes_siglip() -> DualEncoderConfig:
    # shapes_clip's towers and the sigmoid loss with the paper's initialisation, t = 10 and b = -10. Measured at 400
    # steps (batch 128, conv stem), SigLIP's own MAP head and bidirectional last-token text tower reached 28 %
    # zero-shot, these towers 40 %. b = -10 starts slowly (every pair's logit sits near -10 + 10 x cos, and the
    # towers start with embeddings at cosine ~0.98 to each other) but learns shape faster: at batch 64 x 1600 steps
    # (H100 sweep, seed 0) 93.2 % / 84.8 % zero-shot (seen / held-out) against 70.8 % / 66.0 % with b = -log 127,
    # which gives the negatives the positive's total weight at the first step.
    return DualEncoderConfig(
        vision=_shapes_vision(), text=_shapes_text(), embed_dim=128, projection_bias=True,
        logit_scale_init=math.log(10.0), logit_bias_init=-10.0, loss="siglip",
    )  # fmt: skip


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


@register_preset
def navit_shapes() -> DualEncoderConfig:
    # shapes_clip's towers and softmax loss: the sigmoid loss learned shape half as fast on ShapesWorld (README), and
    # with it navit_shapes was at 56 % zero-shot after 1600 of its 2400 steps. NaViT's claims are about the input.
    config = shapes_clip()
    # Packed patches are cut apart before the encoder: the one-convolution patch stem, not the overlapping conv stem.
    return config.replace(vision=config.vision.replace(pos_embed="factorized", max_grid=16, stem="patch"))


# --- ShapesWorld classifier: shapes_clip's image tower (mean pooling) with a colour + shape head (8 + 5 outputs),
# pretrained by the classify_shapes recipe to initialise or lock (LiT) the image tower of shapes_clip / shapes_siglip.


@register_preset
def shapes_classifier() -> ImageClassifierConfig:
    return ImageClassifierConfig(vision=_shapes_vision(), num_classes=13)


# --- FILIP on ShapesWorld: shapes_clip's towers (mean pooling, no class token, so every patch token the loss scores
# is trained) with token-wise late interaction and the FILIP loss.


@register_preset
def shapes_filip() -> DualEncoderConfig:
    return shapes_clip().replace(interaction="token", loss="filip")
