"""Molmo's 2x2 attention pooling (Deitke et al., 2024, "Molmo and PixMo: Open Weights and Open Data for
State-of-the-Art Vision-Language Models"): each 2x2 window of tokens is pooled by multi-head attention whose query
is the window's mean and whose keys and values are the window's tokens, then an MLP projects to D_lm.

tokens (B, N, D_vis) on a (rows, cols) grid -> (B, M, D_lm) on the ceil(rows/2) x ceil(cols/2) grid. An odd grid's
last row or column of windows hangs over the edge: the positions outside take part neither in the mean nor as keys
(the masked pooling of Molmo 2; Molmo 1 zero-pads the map and lets the zeros into both), so an edge window's output
depends on the image's own tokens only. The projector is SwiGLU without bias by default, as Molmo's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import check_grid, gather_tokens, grid_windows, none_if_full
from vlkit.config import ConfigBase, register_config
from vlkit.layers.attention import CrossAttention
from vlkit.layers.mlp import build_mlp


@register_config
@dataclass(frozen=True)
class AttentionPoolConfig(ConfigBase):
    """``window``: the pooled window's side; ``head_dim``: None = D_vis / num_heads; ``dim``: the pooled width,
    None = D_vis; ``mlp_dim``: the projector's hidden width, None = D_lm."""

    kind: ClassVar[str] = "attention_pool"

    window: int = 2
    num_heads: int = 16
    head_dim: int | None = None
    dim: int | None = None
    mlp_dim: int | None = None
    act: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "swiglu"] = "swiglu"
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.window < 1 or self.num_heads < 1:
            raise ValueError(f"attention pool needs window >= 1 and num_heads >= 1, got {self.window}, "
                             f"{self.num_heads}")  # fmt: skip


class AttentionPoolBridge(Bridge):
    config_class = AttentionPoolConfig

    def __init__(self, config: AttentionPoolConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        if config.head_dim is None and vision_dim % config.num_heads:
            raise ValueError(f"attention pool: vision width {vision_dim} is not divisible by num_heads "
                             f"{config.num_heads}; set head_dim")  # fmt: skip
        self.config = config
        dim = config.dim or vision_dim
        self.attn = CrossAttention(vision_dim, config.num_heads, head_dim=config.head_dim, out_dim=dim)
        self.mlp = build_mlp(dim, config.mlp_dim or lm_dim, config.act, bias=config.mlp_bias, out_dim=lm_dim)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        grid = check_grid(tokens, grid, mask, "attention pool")
        batch, _, dim = tokens.shape
        windows = grid_windows(grid, self.config.window, "attention pool", partial=True)
        size = windows.index.shape[-1]
        window_tokens = gather_tokens(tokens, windows.index)  # (B, M, w*w, D)
        weights = windows.valid.to(tokens.dtype)[..., None]  # (B, M, w*w, 1)
        query = (window_tokens * weights).sum(2) / weights.sum(2).clamp(min=1)  # (B, M, D)
        # A window past the end of a smaller image has no valid key; letting it see its (zero-index) tokens keeps
        # SDPA's softmax finite, and its output is zeroed below.
        keys = (windows.valid | ~windows.mask[..., None]).view(-1, 1, 1, size)  # (B*M, 1, 1, w*w)
        pooled = self.attn(query.reshape(-1, 1, dim), window_tokens.reshape(-1, size, dim), mask=keys)
        out = self.mlp(pooled.view(batch, windows.index.shape[1], -1))  # (B, M, D_lm)
        out = out * windows.mask[..., None].to(out.dtype)
        return BridgeOutput(out, windows.grid, none_if_full(windows.mask))

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        window = self.config.window
        return ((grid[:, 0] + window - 1) // window) * ((grid[:, 1] + window - 1) // window)
