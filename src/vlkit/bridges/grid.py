"""Bookkeeping for batches of token grids: validation, windows, a zero-padded 2D canvas, adaptive pooling weights.

A batch holds B images' vision tokens (B, N, D) left-aligned in raster order: image b's rows*cols tokens first,
padding after; ``grid`` (B, 2) long holds each image's (rows, cols). The helpers here turn that layout into gather
indices (the f x f windows of each grid; a canvas of the batch's largest rows x cols with every image in its top-left
corner) and into per-image averaging matrices, so a bridge runs one batched op over images of different grids
rather than a loop per image. They are shared by the bridges and import nothing above ``torch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def check_mask(tokens: torch.Tensor, mask: torch.Tensor | None, name: str) -> None:
    if tokens.ndim != 3:
        raise ValueError(f"{name}: tokens must be (B, N, D), got shape {tuple(tokens.shape)}")
    if mask is not None and (mask.shape != tokens.shape[:2] or mask.dtype != torch.bool):
        raise ValueError(
            f"{name}: mask must be bool (B, N) = {tuple(tokens.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
        )


def padding_mask(counts: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) bool: True at the first ``counts[b]`` positions of row b."""
    return torch.arange(length, device=counts.device)[None, :] < counts[:, None]


def check_grid(tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """Validate a grid batch and return the grid as a long tensor on the tokens' device.

    Each image's rows*cols tokens must fit the batch's N; the mask (when given) must mark exactly those first
    rows*cols tokens real; without a mask every image must fill all N positions.
    """
    check_mask(tokens, mask, name)
    batch, length, _ = tokens.shape
    if tuple(grid.shape) != (batch, 2) or grid.is_floating_point():
        raise ValueError(f"{name}: grid must be an integer (B, 2) = ({batch}, 2) tensor, got {grid.dtype} "
                         f"{tuple(grid.shape)}")  # fmt: skip
    grid = grid.to(device=tokens.device, dtype=torch.long)
    sizes = grid.tolist()
    for image, (rows, cols) in enumerate(sizes):
        if rows < 1 or cols < 1:
            raise ValueError(f"{name}: image {image} has an empty {rows}x{cols} grid")
        if rows * cols > length:
            raise ValueError(f"{name}: image {image}'s {rows}x{cols} grid has {rows * cols} tokens, more than the "
                             f"batch's {length}")  # fmt: skip
        if mask is None and rows * cols != length:
            raise ValueError(f"{name}: image {image}'s {rows}x{cols} grid has {rows * cols} tokens, not the batch's "
                             f"{length}; a padded batch needs a mask")  # fmt: skip
    if mask is not None:
        expected = padding_mask(grid[:, 0] * grid[:, 1], length)
        if not torch.equal(mask, expected):
            image = int((mask != expected).any(dim=1).nonzero()[0])
            rows, cols = sizes[image]
            raise ValueError(
                f"{name}: the mask of image {image} ({rows}x{cols} grid) does not mark exactly its first "
                f"{rows * cols} tokens real; grid bridges take each image's tokens left-aligned in raster order"
            )
    return grid


def grid_positions_batch(grid: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L, 2) long (row, col) of every token of each image's raster order; 0 at padding."""
    index = torch.arange(length, device=grid.device)[None, :]  # (1, L)
    cols = grid[:, 1:]  # (B, 1)
    positions = torch.stack([index // cols, index % cols], dim=-1)  # (B, L, 2)
    real = padding_mask(grid[:, 0] * grid[:, 1], length)
    return positions * real[..., None]


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D) gathered at ``index`` (B, ...) along N -> (B, ..., D)."""
    batch, _, dim = tokens.shape
    flat = index.reshape(batch, -1, 1).expand(-1, -1, dim)  # (B, K, D)
    return tokens.gather(1, flat).view(*index.shape, dim)


@dataclass
class Windows:
    """The f x f windows of each image's grid, one output token per window, in raster order of the output grid."""

    index: torch.Tensor  # (B, M, f*f) long: each window position's token index; 0 where ``valid`` is False
    valid: torch.Tensor  # (B, M, f*f) bool: the position lies inside the image's grid (and the window exists)
    grid: torch.Tensor  # (B, 2) long: the output grid, ceil(grid / f)
    mask: torch.Tensor  # (B, M) bool: the output token exists (M is the batch's largest window count)


def grid_windows(grid: torch.Tensor, factor: int, name: str, partial: bool = False) -> Windows:
    """Windows of ``factor`` x ``factor`` tokens, each window's positions in raster order (row offset, then column).

    Without ``partial`` every grid must divide by ``factor``; with it the last row and column of windows may hang
    over the grid's edge, and the positions outside are marked invalid.
    """
    rows, cols = grid[:, 0], grid[:, 1]
    if not partial:
        bad = ((rows % factor) != 0) | ((cols % factor) != 0)
        if bool(bad.any()):
            image = int(bad.nonzero()[0])
            raise ValueError(f"{name}: image {image}'s {int(rows[image])}x{int(cols[image])} grid is not divisible "
                             f"by {factor}")  # fmt: skip
    out_rows, out_cols = (rows + factor - 1) // factor, (cols + factor - 1) // factor
    counts = out_rows * out_cols
    length = int(counts.max())
    window = torch.arange(length, device=grid.device)[None, :]  # (1, M)
    offsets = torch.arange(factor, device=grid.device)
    row = (window // out_cols[:, None])[..., None, None] * factor + offsets[:, None]  # (B, M, f, 1)
    col = (window % out_cols[:, None])[..., None, None] * factor + offsets[None, :]  # (B, M, 1, f)
    exists = window < counts[:, None]  # (B, M)
    valid = (row < rows[:, None, None, None]) & (col < cols[:, None, None, None]) & exists[..., None, None]
    index = torch.where(valid, row * cols[:, None, None, None] + col, 0)  # (B, M, f, f)
    return Windows(index.flatten(2), valid.flatten(2), torch.stack([out_rows, out_cols], dim=-1), exists)


def to_canvas(tokens: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, N, D) -> a zero-padded map (B, D, H, W) with H, W the batch's largest rows and cols, each image in
    its top-left corner, and the map's validity (B, 1, H, W) in the tokens' dtype.

    Zeros outside each image are what a zero-padded convolution or ``grid_sample`` sees past the edge of that image
    alone, so ops on the canvas match ops on each image by itself as long as the padding is kept at zero.
    """
    batch, _, dim = tokens.shape
    height, width = int(grid[:, 0].max()), int(grid[:, 1].max())
    row = torch.arange(height, device=grid.device)[None, :, None]
    col = torch.arange(width, device=grid.device)[None, None, :]
    valid = (row < grid[:, 0, None, None]) & (col < grid[:, 1, None, None])  # (B, H, W)
    index = torch.where(valid, row * grid[:, 1, None, None] + col, 0)  # (B, H, W)
    canvas = gather_tokens(tokens, index.flatten(1)) * valid.flatten(1)[..., None].to(tokens.dtype)  # (B, H*W, D)
    canvas = canvas.transpose(1, 2).reshape(batch, dim, height, width)  # (B, D, H, W)
    return canvas, valid[:, None].to(tokens.dtype)


def _bins(extent: torch.Tensor, size: int, length: int) -> torch.Tensor:
    """(B, size, length): row i averages positions [floor(i*e/size), ceil((i+1)*e/size)) of an extent e, as
    ``F.adaptive_avg_pool2d`` does along one axis."""
    i = torch.arange(size, device=extent.device)[None, :]  # (1, s)
    start = (i * extent[:, None]) // size  # (B, s)
    end = ((i + 1) * extent[:, None] + size - 1) // size
    position = torch.arange(length, device=extent.device)[None, None, :]  # (1, 1, L)
    inside = (position >= start[..., None]) & (position < end[..., None])  # (B, s, L)
    return inside / (end - start)[..., None]


def adaptive_pool_weights(grid: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """(B, size*size, height*width) averaging matrix of ``F.adaptive_avg_pool2d(image, size)`` for each image's
    own grid, laid out on a (height, width) canvas: ``weights @ canvas.flatten(2).mT`` pools every image at once."""
    row_bins = _bins(grid[:, 0], size, height)  # (B, s, H)
    col_bins = _bins(grid[:, 1], size, width)  # (B, s, W)
    weights = row_bins[:, :, None, :, None] * col_bins[:, None, :, None, :]  # (B, s, s, H, W)
    return weights.reshape(grid.shape[0], size * size, height * width)


def per_image_tables(grid: torch.Tensor, length: int, table: Callable[[tuple[int, int]], torch.Tensor]) -> torch.Tensor:
    """(B, L, D): ``table((rows, cols))`` (rows*cols, D) computed once per distinct grid, each image's zero-padded to
    L; images of one batch usually share a handful of grids, so this is a few calls, not one per image."""
    distinct, which = torch.unique(grid, dim=0, return_inverse=True)  # (U, 2), (B,)
    tables = [F.pad(table((rows, cols)), (0, 0, 0, length - rows * cols)) for rows, cols in distinct.tolist()]
    # index_select, not [which]: the backward of advanced indexing (index_put_ with accumulate) adds the batch's
    # many copies of one table in thread-timing order on a multi-threaded CPU, so training was not reproducible.
    return torch.stack(tables).index_select(0, which)  # (B, L, D)


def none_if_full(mask: torch.Tensor) -> torch.Tensor | None:
    """The bridge interface's output mask: None when every output token is real."""
    return None if bool(mask.all()) else mask


def check_square(num_queries: int, name: str) -> None:
    """A bridge whose M outputs form a sqrt(M) x sqrt(M) grid needs a square M."""
    side = math.isqrt(num_queries)
    if num_queries < 1 or side * side != num_queries:
        raise ValueError(f"{name}: num_queries={num_queries} must be a square (the output grid is sqrt(M) x sqrt(M))")
