"""Two-layer MLP bridge: LLaVA-1.5's ``mlp2x_gelu`` (Liu et al., 2023, "Improved Baselines with Visual Instruction
Tuning"): Linear, activation, Linear on each vision token.

tokens (B, N, D_vis) -> (B, N, D_lm); the grid and mask pass through unchanged (prefix tokens too, as in the
linear bridge; ``num_output_tokens`` counts the grid's rows*cols). The parameters are named
``linear_1`` / ``linear_2`` as in transformers' ``LlavaMultiModalProjector``, whose ``projector_hidden_act`` is
``act`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import check_mask
from vlkit.config import ConfigBase, register_config
from vlkit.layers.mlp import activation


@register_config
@dataclass(frozen=True)
class MLPBridgeConfig(ConfigBase):
    """``mlp_dim``: the hidden width; None = D_lm, as LLaVA-1.5."""

    kind: ClassVar[str] = "mlp_bridge"

    act: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu"] = "gelu"
    mlp_dim: int | None = None
    bias: bool = True


class MLPBridge(Bridge):
    config_class = MLPBridgeConfig

    def __init__(self, config: MLPBridgeConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        hidden = config.mlp_dim or lm_dim
        self.linear_1 = nn.Linear(vision_dim, hidden, bias=config.bias)
        self.act = activation(config.act)
        self.linear_2 = nn.Linear(hidden, lm_dim, bias=config.bias)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        check_mask(tokens, mask, "mlp bridge")
        out = self.linear_2(self.act(self.linear_1(tokens)))
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        return BridgeOutput(out, grid, mask)

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return grid[:, 0] * grid[:, 1]
