"""Single-layer cross-attention resampler (Qwen-VL, Bai et al., 2023, "Qwen-VL: A Versatile Vision-Language Model
for Understanding, Localization, Text Reading, and Beyond"; the MiniCPM-V variant, Yao et al., 2024).

tokens (B, N, D_vis) on per-image grids -> (B, M, D_lm) from M learned queries, no output grid. Keys and values are
the vision tokens through ``kv_proj`` (when D_vis differs from the resampler's width) and ``ln_kv``; the queries go
through ``ln_q``; one multi-head cross-attention, then ``ln_post`` and ``proj``, the layout of Qwen-VL's
``attn_pool`` + ``ln_post`` + ``proj``.

2D sin-cos position embeddings (MAE's table) are added on the key path (k = W_k (x + pos), v = W_v x) and, in
Qwen-VL, to the queries (the sqrt(M) x sqrt(M) grid's table). Qwen-VL's key positions are that query table resized
bicubically to the image's grid ("interpolated"); MiniCPM-V computes the table at the image's own integer positions
("computed") and gives the queries none. Both are per image, from each image's own grid, with padded keys masked,
so slices of different grids share a batch (MiniCPM-V's point): every image's output equals its output alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import check_grid, grid_positions_batch, padding_mask, per_image_tables
from vlkit.config import ConfigBase, register_config
from vlkit.layers.attention import CrossAttention
from vlkit.layers.pos_embed import grid_positions, sincos_2d_at


@register_config
@dataclass(frozen=True)
class ResamplerConfig(ConfigBase):
    """``dim``: the resampler's width, None = D_lm (Qwen-VL works at the LM's width); ``num_heads``: None =
    dim / 128, as Qwen-VL and MiniCPM-V. Qwen-VL: 256 queries, ``query_pos_embed=True``,
    ``key_pos_embed="interpolated"``; MiniCPM-V: 64 or 96 queries, ``query_pos_embed=False``,
    ``key_pos_embed="computed"``."""

    kind: ClassVar[str] = "resampler"

    num_queries: int = 256
    dim: int | None = None
    num_heads: int | None = None
    query_pos_embed: bool = True
    key_pos_embed: Literal["interpolated", "computed"] = "interpolated"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_queries)
        needs_square = self.query_pos_embed or self.key_pos_embed == "interpolated"
        if self.num_queries < 1 or (needs_square and side * side != self.num_queries):
            raise ValueError(f"resampler: num_queries={self.num_queries} must be a square when the queries' grid "
                             "carries positions (query_pos_embed or key_pos_embed='interpolated')")  # fmt: skip

    @property
    def query_grid(self) -> tuple[int, int]:
        side = math.isqrt(self.num_queries)
        return side, side


class Resampler(Bridge):
    config_class = ResamplerConfig

    def __init__(self, config: ResamplerConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        dim = config.dim or lm_dim
        num_heads = config.num_heads or max(1, dim // 128)
        if dim % num_heads or dim % 4:
            raise ValueError(f"resampler: width {dim} must divide by num_heads {num_heads} and by 4 (sin-cos)")
        self.config = config
        self.dim = dim
        self.queries = nn.Parameter(torch.empty(config.num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.kv_proj = nn.Linear(vision_dim, dim, bias=False) if vision_dim != dim else nn.Identity()
        self.ln_q = nn.LayerNorm(dim, eps=config.norm_eps)
        self.ln_kv = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = CrossAttention(dim, num_heads)
        self.ln_post = nn.LayerNorm(dim, eps=config.norm_eps)
        self.proj = nn.Linear(dim, lm_dim, bias=False)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        grid = check_grid(tokens, grid, mask, "resampler")
        batch, length, _ = tokens.shape
        context = self.ln_kv(self.kv_proj(tokens))  # (B, N, dim)
        queries = self.ln_q(self.queries)  # (M, dim)
        if self.config.query_pos_embed:
            queries = queries + self._sincos(grid_positions(self.config.query_grid, tokens.device)).to(queries.dtype)
        key_pos = self.key_positions(grid, length).to(context.dtype)  # (B, N, dim)
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
        out = self.attn(queries.expand(batch, -1, -1), context, mask=key_mask, key_pos=key_pos)
        return BridgeOutput(self.proj(self.ln_post(out)), None, None)

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.full((grid.shape[0],), self.config.num_queries, dtype=torch.long, device=grid.device)

    def key_positions(self, grid: torch.Tensor, length: int) -> torch.Tensor:
        """(B, N, dim) fp32 position embedding of every image's tokens from its own grid; zeros at padding."""
        if self.config.key_pos_embed == "computed":
            real = padding_mask(grid[:, 0] * grid[:, 1], length)[..., None]  # (B, N, 1)
            return self._sincos(grid_positions_batch(grid, length)) * real
        return per_image_tables(grid, length, self._interpolated)

    def _sincos(self, positions: torch.Tensor) -> torch.Tensor:
        return sincos_2d_at(positions.float(), self.dim, endpoint=False)

    def _interpolated(self, grid: tuple[int, int]) -> torch.Tensor:
        """Qwen-VL's key table: the queries' sin-cos grid resized bicubically to ``grid``, (rows*cols, dim)."""
        side = self.config.query_grid[0]
        table = self._sincos(grid_positions(self.config.query_grid, self.queries.device))  # (s*s, dim)
        if tuple(grid) == (side, side):
            return table
        table = table.view(1, side, side, self.dim).permute(0, 3, 1, 2)  # (1, dim, s, s)
        resized = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)  # (1, dim, h, w)
        return resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], self.dim)
