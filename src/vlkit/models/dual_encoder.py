"""Dual encoder: an image tower and a text tower projected into one embedding space (CLIP, SigLIP, LiT, ...).

pixels (B, 3, H, W) -> image features (B, E); ids (B, T) -> text features (B, E). The model owns the learned
temperature ``logit_scale`` (stored as a log, Radford et al., 2021) and, for the sigmoid loss, ``logit_bias``
(Zhai et al., 2023); the losses in ``vlkit.losses`` are separate modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigBase, register_config
from vlkit.encoders import ConvNeXtConfig, ViTConfig, build_encoder
from vlkit.models.base import PretrainedModel
from vlkit.text import TextConfig, TextTransformer


@register_config
@dataclass(frozen=True)
class DualEncoderConfig(ConfigBase):
    kind: ClassVar[str] = "dual_encoder"

    vision: ViTConfig | ConvNeXtConfig
    text: TextConfig
    embed_dim: int = 512
    image_projection: Literal["linear", "none"] = "linear"
    text_projection: Literal["linear", "none"] = "linear"
    projection_bias: bool = False
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    max_logit_scale: float = 100.0
    loss: Literal["clip", "siglip"] = "clip"

    def __post_init__(self) -> None:
        for tower, kind, dim in (
            ("image", self.image_projection, self.vision.dim),
            ("text", self.text_projection, self.text.dim),
        ):
            if kind == "none" and dim != self.embed_dim:
                raise ValueError(
                    f"{tower}_projection='none' needs the {tower} width ({dim}) to equal embed_dim ({self.embed_dim})"
                )


@dataclass
class DualEncoderOutput:
    image_features: torch.Tensor  # (B, E), L2-normalised
    text_features: torch.Tensor  # (B, E), L2-normalised
    logit_scale: torch.Tensor  # scalar, exp() of the parameter, clamped
    logit_bias: torch.Tensor | None


def _projection(kind: str, dim: int, embed_dim: int, bias: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    layer = nn.Linear(dim, embed_dim, bias=bias)
    nn.init.normal_(layer.weight, std=dim**-0.5)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class DualEncoder(PretrainedModel):
    config_class = DualEncoderConfig

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_encoder(config.vision)
        self.text_encoder = TextTransformer(config.text)
        self.image_projection = _projection(
            config.image_projection, config.vision.dim, config.embed_dim, config.projection_bias
        )
        self.text_projection = _projection(
            config.text_projection, config.text.dim, config.embed_dim, config.projection_bias
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.logit_bias_init))) if config.logit_bias_init is not None else None
        )

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_projection(self.image_encoder(pixels))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        features = self.text_projection(self.text_encoder(input_ids, attention_mask))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale), self.logit_bias

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> DualEncoderOutput:
        scale, bias = self.scale_and_bias()
        return DualEncoderOutput(
            self.encode_image(pixels, normalize=True),
            self.encode_text(input_ids, attention_mask, normalize=True),
            scale,
            bias,
        )

    def logits(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image-text logits (B_img, B_txt) as the model's loss sees them: scale * cos + bias."""
        out = self(pixels, input_ids, attention_mask)
        logits = out.logit_scale * out.image_features @ out.text_features.T
        return logits + out.logit_bias if out.logit_bias is not None else logits
