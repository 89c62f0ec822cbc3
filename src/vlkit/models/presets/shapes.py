"""ShapesWorld models: the small towers the recipes train from scratch (``shapes_clip``, ``shapes_siglip``,
``shapes_filip``, ``navit_shapes``) and the classifier that pretrains their image tower (``shapes_classifier``).

Sized so a recipe trains in minutes on a laptop CPU (64x64 images, 8x8 patches). Plain erf-GELU rather than SigLIP's
tanh-GELU: these are trained from scratch, and tanh-GELU is 3x slower on CPU. An overlapping conv stem instead of the
one-convolution patchify: a supervised shape probe with this tower reaches 98% after 200 steps with it and 82%
without (Xiao et al., 2021, "Early convolutions help transformers see better"). They share their towers, so they live
together rather than with the families whose losses and interactions they take.
"""

from __future__ import annotations

import math

from vlkit.encoders import ViTConfig
from vlkit.models.classifier import ImageClassifierConfig
from vlkit.models.dual_encoder import DualEncoderConfig
from vlkit.registry import register_preset
from vlkit.text import TextConfig


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


# --- FILIP on ShapesWorld: shapes_clip's towers (mean pooling, no class token, so every patch token the loss scores
# is trained) with token-wise late interaction and the FILIP loss.


@register_preset
def shapes_filip() -> DualEncoderConfig:
    return shapes_clip().replace(interaction="token", loss="filip")


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
