"""Image classifier: a vision encoder's pooled output followed by a linear head (ViT, ConvNeXt on ImageNet).

pixels (B, 3, H, W) -> pooled (B, D) -> logits (B, num_classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vlkit.config import ConfigBase, register_config
from vlkit.encoders import ConvNeXtConfig, ViTConfig, build_encoder
from vlkit.models.base import PretrainedModel


@register_config
@dataclass(frozen=True)
class ImageClassifierConfig(ConfigBase):
    kind: ClassVar[str] = "image_classifier"

    vision: ViTConfig | ConvNeXtConfig
    num_classes: int = 1000
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")


class ImageClassifier(PretrainedModel):
    config_class = ImageClassifierConfig

    def __init__(self, config: ImageClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.vision)
        self.head = nn.Linear(config.vision.dim, config.num_classes) if config.num_classes else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits; the processor's name for the images, so ``model(**processor(images=...))``."""
        return self.head(self.encoder(pixel_values))
