"""Pixel shuffle + Linear bridge (Idefics3, Laurençon et al., 2024, "Building and better understanding vision-language
models"; nanoVLM's modality projector): space-to-depth with factor r, then one Linear.

tokens (B, N, D_vis) on a (rows, cols) grid -> (B, M, D_lm) on the (rows/r, cols/r) grid, M = rows*cols / r^2. Each
output token concatenates an r x r window of tokens in raster order (row offset, then column offset, then channel),
the channel order of Idefics3's ``pixel_shuffle``, so its ``modality_projection`` weight loads as it is. Every grid
must divide by r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import check_grid, gather_tokens, grid_windows, none_if_full
from vlkit.config import ConfigBase, register_config


@register_config
@dataclass(frozen=True)
class PixelShuffleConfig(ConfigBase):
    """``factor``: r, the side of the window folded into one token. Idefics3 and nanoVLM project without bias."""

    kind: ClassVar[str] = "pixel_shuffle"

    factor: int = 2
    bias: bool = False

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"pixel shuffle factor must be positive, got {self.factor}")


class PixelShuffleBridge(Bridge):
    config_class = PixelShuffleConfig

    def __init__(self, config: PixelShuffleConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(vision_dim * config.factor**2, lm_dim, bias=config.bias)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        grid = check_grid(tokens, grid, mask, "pixel shuffle bridge")
        windows = grid_windows(grid, self.config.factor, "pixel shuffle bridge")
        folded = gather_tokens(tokens, windows.index).flatten(2)  # (B, M, r*r*D)
        out = self.proj(folded) * windows.mask[..., None].to(folded.dtype)
        return BridgeOutput(out, windows.grid, none_if_full(windows.mask))

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return (grid[:, 0] // self.config.factor) * (grid[:, 1] // self.config.factor)
