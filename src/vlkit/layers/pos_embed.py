"""Position embeddings for 2D token grids, for whole images and for packed sequences with explicit positions.

``LearnedPosEmbed2d``: a learned (N, D) table over a reference grid, resized when the grid differs: bicubic (ViT's
fine-tuning at higher resolution, Dosovitskiy et al., 2021) or bilinear with antialiasing (SigLIP 2's NaFlex,
Tschannen et al., 2025, which resizes the table to every image's own grid). ``FactorizedPosEmbed2d``: NaViT's
factorised embedding (Dehghani et al., 2023), pos = rows[row] + cols[col]. ``sincos_2d`` / ``sincos_2d_at``: fixed
2D sin-cos embeddings (MAE / big_vision's "simple ViT").

Packed inputs: position ids (S, L, 2) hold each token's (row, col) in its image, segment ids (S, L) the index of its
image (-1 at padding), and ``grids`` (I, 2) every image's full grid; the embeddings come back as (S, L, D).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Interpolation = Literal["bicubic", "bilinear_antialias"]


class LearnedPosEmbed2d(nn.Module):
    """Table of shape (1, num_prefix + h*w, D); prefix rows (class token) are never interpolated."""

    def __init__(
        self, grid: tuple[int, int], dim: int, num_prefix: int = 0, interpolation: Interpolation = "bicubic"
    ) -> None:
        super().__init__()
        self.grid = grid
        self.num_prefix = num_prefix
        self.interpolation = interpolation
        self.weight = nn.Parameter(torch.empty(1, num_prefix + grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.grid):
            return self.weight
        prefix = self.weight[:, : self.num_prefix]
        return torch.cat([prefix, self.resized(grid)[None]], dim=1)

    def resized(self, grid: tuple[int, int]) -> torch.Tensor:
        """The grid part of the table resized to ``grid``: (h*w, D), rows in raster order."""
        table = self.weight[0, self.num_prefix :]
        if tuple(grid) == tuple(self.grid):
            return table
        dim = table.shape[-1]
        table = table.reshape(1, *self.grid, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
        if self.interpolation == "bicubic":
            resized = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False)
        else:
            resized = F.interpolate(
                table.float(), size=tuple(grid), mode="bilinear", align_corners=False, antialias=True
            )
        return resized.to(table.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], dim)  # (N, D)

    def packed(self, position_ids: torch.Tensor, segment_ids: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """(S, L, D) embeddings of packed tokens: the table resized once per distinct grid, then one gather.

        Resizing per distinct grid rather than per image keeps the work at a handful of interpolations per batch.
        """
        if self.num_prefix:
            raise ValueError("packed inputs carry no prefix tokens; this table has prefix rows")
        distinct, which = torch.unique(grids, dim=0, return_inverse=True)  # (U, 2), (I,)
        tables = [self.resized((int(h), int(w))) for h, w in distinct.tolist()]
        sizes = torch.tensor([len(t) for t in tables], device=grids.device)
        offsets = (sizes.cumsum(0) - sizes)[which]  # (I,) where each image's resized table starts
        image = segment_ids.clamp(min=0)  # padding reads image 0's first row, then is zeroed
        index = offsets[image] + position_ids[..., 0] * grids[image, 1] + position_ids[..., 1]  # (S, L)
        # F.embedding, not [index]: its backward sums the rows' gradients in a fixed order (advanced indexing's
        # accumulates in thread-timing order on a multi-threaded CPU), so training reproduces bit for bit.
        embeddings = F.embedding(index, torch.cat(tables))  # (S, L, D)
        return embeddings * (segment_ids >= 0).unsqueeze(-1).to(embeddings.dtype)


class FactorizedPosEmbed2d(nn.Module):
    """NaViT's factorised embedding: learned (max_rows, D) and (max_cols, D) tables, pos = rows[r] + cols[c]."""

    def __init__(self, max_grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.max_grid = max_grid
        self.rows = nn.Parameter(torch.empty(max_grid[0], dim))
        self.cols = nn.Parameter(torch.empty(max_grid[1], dim))
        nn.init.trunc_normal_(self.rows, std=0.02)
        nn.init.trunc_normal_(self.cols, std=0.02)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``position_ids`` (..., 2) integer (row, col) -> (..., D)."""
        return F.embedding(position_ids[..., 0], self.rows) + F.embedding(position_ids[..., 1], self.cols)

    def grid(self, grid: tuple[int, int]) -> torch.Tensor:
        """(h*w, D) for a whole grid in raster order; a grid beyond the tables is an error naming both."""
        if grid[0] > self.max_grid[0] or grid[1] > self.max_grid[1]:
            raise ValueError(f"a {grid[0]}x{grid[1]} patch grid exceeds the factorised tables' {self.max_grid}; "
                             "raise ViTConfig.max_grid")  # fmt: skip
        table = self.rows[: grid[0], None, :] + self.cols[None, : grid[1], :]  # (h, w, D)
        return table.reshape(grid[0] * grid[1], -1)


def grid_positions(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(h*w, 2) long (row, col) of a grid's tokens in raster order."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def sincos_2d_at(
    position_ids: torch.Tensor, dim: int, temperature: float = 10000.0, endpoint: bool = True
) -> torch.Tensor:
    """(..., D) fixed embedding of (row, col) positions (..., 2): a quarter of the channels each for sin/cos of x
    (the column) and of y (the row).

    The frequencies are temperature ** -e for D/4 exponents e evenly spaced in [0, 1]: with ``endpoint`` the last is 1
    (big_vision), without it they stop one step short (MAE's table, which Qwen-VL's and MiniCPM-V's resamplers use).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    steps = (dim // 4 - 1 if dim > 4 else 1) if endpoint else dim // 4
    omega = 1.0 / temperature ** (torch.arange(dim // 4, device=position_ids.device) / steps)
    y = position_ids[..., 0, None] * omega  # (..., D/4)
    x = position_ids[..., 1, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0, endpoint: bool = True) -> torch.Tensor:
    """(h*w, D) fixed embedding of a whole grid in raster order."""
    return sincos_2d_at(grid_positions(grid), dim, temperature, endpoint)
