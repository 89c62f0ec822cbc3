"""Qwen2-VL's 2x2 patch merger (Wang et al., 2024, "Qwen2-VL: Enhancing Vision-Language Model's Perception of the
World at Any Resolution"): LayerNorm on each token, concatenate each 2x2 window of neighbours, MLP to D_lm.

tokens (B, N, D_vis) on a (rows, cols) grid -> (B, M, D_lm) on the (rows/2, cols/2) grid. The window is
concatenated in raster order (row offset, then column offset) — the order in which Qwen2-VL's processor lays the
four patches of a window next to each other — so its ``merger.ln_q`` / ``merger.mlp.0`` / ``merger.mlp.2`` load as
``norm`` / ``mlp.fc1`` / ``mlp.fc2``. Every grid must divide by the factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import check_grid, gather_tokens, grid_windows, none_if_full
from vlkit.config import ConfigBase, register_config
from vlkit.layers.mlp import Mlp


@register_config
@dataclass(frozen=True)
class PatchMergerConfig(ConfigBase):
    """``factor``: the window side (Qwen2-VL's ``spatial_merge_size``); ``mlp_dim``: None = factor^2 * D_vis, as
    Qwen2-VL."""

    kind: ClassVar[str] = "patch_merger"

    factor: int = 2
    mlp_dim: int | None = None
    act: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu"] = "gelu"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"patch merger factor must be positive, got {self.factor}")


class PatchMerger(Bridge):
    config_class = PatchMergerConfig

    def __init__(self, config: PatchMergerConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        merged = vision_dim * config.factor**2
        self.norm = nn.LayerNorm(vision_dim, eps=config.norm_eps)
        self.mlp = Mlp(merged, config.mlp_dim or merged, config.act, out_dim=lm_dim)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        grid = check_grid(tokens, grid, mask, "patch merger")
        windows = grid_windows(grid, self.config.factor, "patch merger")
        merged = gather_tokens(self.norm(tokens), windows.index).flatten(2)  # (B, M, f*f*D)
        out = self.mlp(merged) * windows.mask[..., None].to(merged.dtype)
        return BridgeOutput(out, windows.grid, none_if_full(windows.mask))

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return (grid[:, 0] // self.config.factor) * (grid[:, 1] // self.config.factor)
