"""Composition only: models put encoders, text towers, bridges and language models together; no new layers."""

from vlkit.models.classifier import ImageClassifier, ImageClassifierConfig
from vlkit.models.dual_encoder import DualEncoder, DualEncoderConfig, DualEncoderOutput

__all__ = [
    "DualEncoder",
    "DualEncoderConfig",
    "DualEncoderOutput",
    "ImageClassifier",
    "ImageClassifierConfig",
]
