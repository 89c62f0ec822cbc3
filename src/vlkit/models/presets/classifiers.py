"""Image classifier presets: ImageNet-1k heads on ViT (Dosovitskiy et al., 2021) and ConvNeXt (Liu et al., 2022)
towers, and tiny test models. (The ShapesWorld classifier is with the ShapesWorld models, in ``shapes``.)"""

from __future__ import annotations

from vlkit.encoders import ConvNeXtConfig, ViTConfig
from vlkit.models.classifier import ImageClassifierConfig
from vlkit.registry import register_preset


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


# --- Tiny models for tests.


@register_preset
def test_vit() -> ImageClassifierConfig:
    vision = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=64, pool="mean")
    return ImageClassifierConfig(vision=vision, num_classes=10)


@register_preset
def test_convnext() -> ImageClassifierConfig:
    vision = ConvNeXtConfig(image_size=32, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), drop_path=0.1)
    return ImageClassifierConfig(vision=vision, num_classes=10)
