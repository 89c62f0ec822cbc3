"""Contrastive losses as standalone modules: ``loss(image_features, text_features, logit_scale, logit_bias=None)``
(FILIP: token features plus ``text_mask=`` / ``image_mask=``); each is correct on a batch sharded over ranks."""

from vlkit.losses.contrastive import ClipLoss, SigLipLoss
from vlkit.losses.distributed import all_gather_with_grad
from vlkit.losses.factory import build_contrastive_loss, contrastive_loss_inputs
from vlkit.losses.filip import FilipLoss, filip_similarity

__all__ = [
    "ClipLoss",
    "FilipLoss",
    "SigLipLoss",
    "all_gather_with_grad",
    "build_contrastive_loss",
    "contrastive_loss_inputs",
    "filip_similarity",
]
