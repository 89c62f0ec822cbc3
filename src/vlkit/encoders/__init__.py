"""Vision encoders: pixels (B, 3, H, W) -> tokens (B, N, D) plus their grid, and a pooled head."""

from vlkit.encoders.base import EncoderOutput
from vlkit.encoders.convnext import ConvNeXt, ConvNeXtConfig
from vlkit.encoders.vit import ViT, ViTConfig

VisionConfig = ViTConfig | ConvNeXtConfig


def build_encoder(config: VisionConfig) -> ViT | ConvNeXt:
    if isinstance(config, ViTConfig):
        return ViT(config)
    if isinstance(config, ConvNeXtConfig):
        return ConvNeXt(config)
    raise TypeError(f"no vision encoder for {type(config).__name__}")


__all__ = ["ConvNeXt", "ConvNeXtConfig", "EncoderOutput", "ViT", "ViTConfig", "VisionConfig", "build_encoder"]
