"""Image-text contrastive losses.

``ClipLoss``: softmax InfoNCE over the B x B similarity matrix, averaged over both directions (Radford et al., 2021).
``SigLipLoss``: the pairwise sigmoid loss, -1/B * sum_ij log sigmoid(z_ij (t x_i.y_j + b)) with z_ij = +1 on the
diagonal and -1 elsewhere (Zhai et al., 2023). It never needs a global normalisation, so it is computed in chunks
of text rows: forward and backward each hold only (B x chunk) logits, not (B x B) — the backward pass recomputes
each chunk instead of storing it (a custom autograd function).

Inputs are L2-normalised features (B, E); ``logit_scale`` is the multiplier t (already exponentiated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipLoss(nn.Module):
    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = logit_scale * image_features @ text_features.T  # (B, B)
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


def _sigmoid_chunk_terms(
    image: torch.Tensor, text_chunk: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, c) of one text chunk and the sign matrix z (+1 where row index == offset + column)."""
    logits = scale * image @ text_chunk.T + bias  # (B, c)
    rows = torch.arange(image.shape[0], device=image.device)[:, None]
    cols = torch.arange(text_chunk.shape[0], device=image.device)[None, :] + offset
    signs = (rows == cols).to(logits.dtype) * 2 - 1
    return logits, signs


class _ChunkedSigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        # Accumulate in at least fp32 (bf16 sums lose too many bits), but keep fp64 inputs in fp64.
        accumulate = torch.promote_types(image.dtype, torch.float32)
        total = image.new_zeros((), dtype=accumulate)
        for start in range(0, text.shape[0], chunk_size):
            logits, signs = _sigmoid_chunk_terms(image, text[start : start + chunk_size], scale, bias, start)
            total = total - F.logsigmoid(signs * logits).to(accumulate).sum()
        ctx.save_for_backward(image, text, scale, bias)
        ctx.chunk_size = chunk_size
        return total / image.shape[0]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        image, text, scale, bias = ctx.saved_tensors
        chunk_size: int = ctx.chunk_size
        grad_image = torch.zeros_like(image)
        grad_text = torch.zeros_like(text)
        accumulate = torch.promote_types(image.dtype, torch.float32)
        grad_scale = torch.zeros_like(scale, dtype=accumulate)
        grad_bias = torch.zeros_like(bias, dtype=accumulate)
        factor = grad_output / image.shape[0]
        for start in range(0, text.shape[0], chunk_size):
            chunk = text[start : start + chunk_size]
            logits, signs = _sigmoid_chunk_terms(image, chunk, scale, bias, start)
            # d/dl [-log sigmoid(z l)] = -z sigmoid(-z l)
            grad_logits = (-signs * torch.sigmoid(-signs * logits)) * factor  # (B, c)
            grad_image += scale * grad_logits @ chunk
            grad_text[start : start + chunk_size] = scale * grad_logits.T @ image
            grad_scale += (grad_logits * (image @ chunk.T)).sum().to(accumulate)
            grad_bias += grad_logits.sum().to(accumulate)
        return grad_image, grad_text, grad_scale.to(scale.dtype), grad_bias.to(bias.dtype), None


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss, chunked over text rows so memory is O(B x chunk_size)."""

    def __init__(self, chunk_size: int = 1024) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(f"feature shapes differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
        bias = logit_bias if logit_bias is not None else logit_scale.new_zeros(())
        dtype = torch.promote_types(image_features.dtype, text_features.dtype)
        return _ChunkedSigmoidLoss.apply(
            image_features.to(dtype), text_features.to(dtype), logit_scale.to(dtype), bias.to(dtype), self.chunk_size
        )
