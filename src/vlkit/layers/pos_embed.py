"""Position embeddings for 2D token grids.

``LearnedPosEmbed2d``: a learned (N, D) table over a reference grid, resized with bicubic interpolation when the
grid differs (ViT's fine-tuning at higher resolution, Dosovitskiy et al., 2021). ``sincos_2d``: fixed 2D sin-cos
embeddings (MAE / big_vision's "simple ViT").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnedPosEmbed2d(nn.Module):
    """Table of shape (1, num_prefix + h*w, D); prefix rows (class token) are never interpolated."""

    def __init__(self, grid: tuple[int, int], dim: int, num_prefix: int = 0) -> None:
        super().__init__()
        self.grid = grid
        self.num_prefix = num_prefix
        self.weight = nn.Parameter(torch.empty(1, num_prefix + grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.grid):
            return self.weight
        prefix, table = self.weight[:, : self.num_prefix], self.weight[:, self.num_prefix :]
        dim = table.shape[-1]
        table = table.reshape(1, *self.grid, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
        table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False).to(table.dtype)
        table = table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)  # (1, N, D)
        return torch.cat([prefix, table], dim=1)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(h*w, D) fixed embedding: a quarter of the channels each for sin/cos of y and of x."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.flatten()[:, None] * omega[None]  # (N, D/4)
    x = x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
