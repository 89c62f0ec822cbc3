"""Linear projection bridge (LLaVA, Liu et al., 2023, "Visual Instruction Tuning"): one Linear per vision token.

tokens (B, N, D_vis) -> (B, N, D_lm); the grid and mask pass through unchanged, so M = N and any prefix tokens (a
class token the VLM chose to keep) are projected like the rest. ``num_output_tokens`` counts the grid's rows*cols:
prefix tokens come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import check_mask
from vlkit.config import ConfigBase, register_config


@register_config
@dataclass(frozen=True)
class LinearBridgeConfig(ConfigBase):
    kind: ClassVar[str] = "linear_bridge"

    bias: bool = True


class LinearBridge(Bridge):
    config_class = LinearBridgeConfig

    def __init__(self, config: LinearBridgeConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(vision_dim, lm_dim, bias=config.bias)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        check_mask(tokens, mask, "linear bridge")
        out = self.proj(tokens)
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        return BridgeOutput(out, grid, mask)

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return grid[:, 0] * grid[:, 1]
