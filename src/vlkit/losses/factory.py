"""Pick a contrastive loss by the model's ``config.loss`` name and call any of them the same way.

``loss_fn(**contrastive_loss_inputs(output))`` works for ``ClipLoss``, ``SigLipLoss`` and ``FilipLoss``: a dual
encoder output carrying token features (``interaction="token"``) feeds FILIP its tokens and text mask, any other
feeds the pooled features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlkit.losses.contrastive import ClipLoss, SigLipLoss
from vlkit.losses.filip import FilipLoss

_LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss, "filip": FilipLoss}


def build_contrastive_loss(name: str, **options: Any) -> nn.Module:
    """``"clip"`` | ``"siglip"`` | ``"filip"`` -> the loss module; ``options`` go to its constructor."""
    if name not in _LOSSES:
        raise ValueError(f"unknown contrastive loss {name!r}; known: {sorted(_LOSSES)}")
    return _LOSSES[name](**options)


def contrastive_loss_inputs(output: Any) -> dict[str, torch.Tensor | None]:
    """Keyword arguments for the loss from a ``DualEncoderOutput`` (duck-typed: losses do not import models)."""
    image_tokens = getattr(output, "image_tokens", None)
    if image_tokens is not None:
        return {
            "image_tokens": image_tokens,
            "text_tokens": output.text_tokens,
            "logit_scale": output.logit_scale,
            "logit_bias": output.logit_bias,
            "text_mask": output.text_mask,
            "image_mask": getattr(output, "image_mask", None),
        }
    return {
        "image_features": output.image_features,
        "text_features": output.text_features,
        "logit_scale": output.logit_scale,
        "logit_bias": output.logit_bias,
    }
