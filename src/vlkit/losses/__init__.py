"""Contrastive losses as standalone modules: ``loss(image_features, text_features, logit_scale, logit_bias=None)``."""

from vlkit.losses.contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
