"""Normalisation layers: LayerNorm, RMSNorm (Zhang & Sennrich, 2019) and channels-first LayerNorm2d (ConvNeXt).

LayerNorm/RMSNorm: (..., D) -> (..., D). LayerNorm2d: (B, C, H, W) -> (B, C, H, W).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same numbers bit for bit as the lines below, in one call instead of nine (a decoder's per-token cost).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 (under bf16 the mean of squares loses too many bits), round to x's dtype, then scale: the
        # roundings of Llama's and Qwen2's reference implementations, so that a bf16 checkpoint decodes as theirs.
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed).to(x.dtype)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


def build_norm(kind: Literal["layernorm", "rmsnorm"], dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")
