"""Honeybee's D-Abstractor (Cha et al., 2023, "Honeybee: Locality-enhanced Projector for Multimodal LLM"): M queries
read the 2D feature map with deformable attention (Zhu et al., 2021, "Deformable DETR"), then an MLP readout.

tokens (B, N, D_vis) on per-image (rows, cols) grids -> (B, M, D_lm) on a fixed (sqrt M, sqrt M) grid. The queries
start from the map adaptively average-pooled to sqrt(M) x sqrt(M) (Honeybee's pooled initialisation, which keeps
the image's layout in the queries), with a learned query position embedding. Each of ``depth`` post-LN Deformable
DETR decoder layers runs self-attention over the queries (position added to queries and keys), deformable attention
(each head samples ``num_points`` points around the query's learnable reference point — initialised on the output
grid's cell centres — at offsets predicted from the query, bilinearly with ``F.grid_sample``, weighted by a softmax
over the points) and a feed-forward block. Single scale: one feature map.

Offsets are in units of the image's own tokens and reference points in [0, 1] of the image's own grid, so images of
different grids share a zero-padded canvas: a sample past an image's edge reads the canvas' zeros, as it would
read ``grid_sample``'s zero padding for the image alone, and the pooling averages each image's positions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.c_abstractor import honeybee_readout
from vlkit.bridges.grid import adaptive_pool_weights, check_grid, check_square, per_image_tables, to_canvas
from vlkit.config import ConfigBase, register_config
from vlkit.layers.attention import CrossAttention
from vlkit.layers.mlp import Mlp
from vlkit.layers.pos_embed import LearnedPosEmbed2d


@register_config
@dataclass(frozen=True)
class DAbstractorConfig(ConfigBase):
    """``dim``: the decoder's width (the vision tokens are projected to it when it differs); ``depth``: decoder
    layers; ``mlp_dim``: their feed-forward width, None = 4 x dim; ``pos_embed_grid``: the reference grid of a learned
    position table added to the projected tokens, None for no table. Activation and LayerNorm eps as Deformable
    DETR's decoder."""

    kind: ClassVar[str] = "d_abstractor"

    num_queries: int = 144
    dim: int = 1024
    depth: int = 2
    num_heads: int = 8
    num_points: int = 4
    mlp_dim: int | None = None
    act: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu"] = "relu"
    norm_eps: float = 1e-5
    mlp_depth: int = 2
    pos_embed_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_square(self.num_queries, "D-Abstractor")
        if self.dim % self.num_heads:
            raise ValueError(f"D-Abstractor dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1 or self.num_points < 1 or self.mlp_depth < 1:
            raise ValueError("D-Abstractor needs depth, num_points and mlp_depth >= 1, got "
                             f"{self.depth}, {self.num_points}, {self.mlp_depth}")  # fmt: skip


class DeformableAttention(nn.Module):
    """Single-scale multi-head deformable attention.

    query (B, M, D), reference points (M, 2) as (x, y) in [0, 1] of each image, value map (B, D, H, W) on a canvas
    whose top-left rows x cols hold image b (``grid``) -> (B, M, D).
    """

    def __init__(self, dim: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.num_heads, self.num_points, self.head_dim = num_heads, num_points, dim // num_heads
        self.offsets = nn.Linear(dim, num_heads * num_points * 2)
        self.weights = nn.Linear(dim, num_heads * num_points)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # Deformable DETR's start: zero offset weights and uniform attention, with the bias spreading each head's
        # points along its own direction at distances 1..P tokens, so sampling starts as a ring of fixed patterns.
        angles = torch.arange(self.num_heads) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (heads, 2)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, :, None]  # (1, P, 1)
        nn.init.zeros_(self.offsets.weight)
        with torch.no_grad():
            self.offsets.bias.copy_((directions[:, None, :] * distances).flatten())
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)
        for linear in (self.value, self.proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        value_map: torch.Tensor,
        valid: torch.Tensor,
        grid: torch.Tensor,
    ) -> torch.Tensor:
        batch, num_queries, _ = query.shape
        heads, points = self.num_heads, self.num_points
        height, width = value_map.shape[-2:]
        value = self.value(value_map.permute(0, 2, 3, 1)) * valid.permute(0, 2, 3, 1)  # (B, H, W, D), 0 off-image
        value = value.view(batch, height, width, heads, self.head_dim).permute(0, 3, 4, 1, 2)  # (B, h, hd, H, W)
        value = value.reshape(batch * heads, self.head_dim, height, width)
        offsets = self.offsets(query).view(batch, num_queries, heads, points, 2)
        weights = self.weights(query).view(batch, num_queries, heads, points).softmax(-1)
        size = grid.flip(-1).to(query.dtype)[:, None, None, None, :]  # (B, 1, 1, 1, 2): (cols, rows)
        # An offset of 1 is one token of the image (Deformable DETR normalises by the map's size).
        location = reference[None, :, None, None, :] + offsets / size  # (B, M, heads, P, 2) in the image's [0, 1]
        canvas = torch.tensor([width, height], dtype=query.dtype, device=query.device)
        # grid_sample's [-1, 1] spans the whole canvas, of which the image covers the top-left (cols/W, rows/H).
        sample = 2 * location * (size / canvas) - 1
        sample = sample.permute(0, 2, 1, 3, 4).reshape(batch * heads, num_queries, points, 2)
        sampled = F.grid_sample(value, sample, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = weights.permute(0, 2, 1, 3).reshape(batch * heads, 1, num_queries, points)
        out = (sampled * weights).sum(-1)  # (B*heads, hd, M)
        out = out.view(batch, heads * self.head_dim, num_queries).transpose(1, 2)  # (B, M, D)
        return self.proj(out)


class DeformableDecoderLayer(nn.Module):
    """Deformable DETR's post-LN decoder layer: self-attention, deformable cross-attention, feed-forward."""

    def __init__(self, config: DAbstractorConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.self_attn = CrossAttention(dim, config.num_heads)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.deform_attn = DeformableAttention(dim, config.num_heads, config.num_points)
        self.deform_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, config.mlp_dim or 4 * dim, config.act)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference: torch.Tensor,
        value_map: torch.Tensor,
        valid: torch.Tensor,
        grid: torch.Tensor,
    ) -> torch.Tensor:
        # DETR's self-attention: position on queries and keys, not on values (q = W_q (x + pos), k = W_k (x + pos)).
        x = self.self_norm(x + self.self_attn(x + pos, x, key_pos=pos))
        x = self.deform_norm(x + self.deform_attn(x + pos, reference, value_map, valid, grid))
        return self.mlp_norm(x + self.mlp(x))


class DAbstractor(Bridge):
    config_class = DAbstractorConfig

    def __init__(self, config: DAbstractorConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        self.side = math.isqrt(config.num_queries)
        dim = config.dim
        self.input_proj = nn.Linear(vision_dim, dim) if vision_dim != dim else nn.Identity()
        self.pos_embed = LearnedPosEmbed2d(config.pos_embed_grid, dim) if config.pos_embed_grid else None
        self.query_pos = nn.Parameter(torch.empty(config.num_queries, dim))
        nn.init.trunc_normal_(self.query_pos, std=0.02)
        centres = (torch.arange(self.side, dtype=torch.float32) + 0.5) / self.side
        rows, cols = torch.meshgrid(centres, centres, indexing="ij")
        self.reference_points = nn.Parameter(torch.stack([cols.flatten(), rows.flatten()], dim=-1))  # (M, 2): (x, y)
        self.layers = nn.ModuleList(DeformableDecoderLayer(config) for _ in range(config.depth))
        self.readout = honeybee_readout(dim, lm_dim, config.mlp_depth)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        grid = check_grid(tokens, grid, mask, "D-Abstractor")
        batch, length, _ = tokens.shape
        x = self.input_proj(tokens)
        if self.pos_embed is not None:
            x = x + per_image_tables(grid, length, self.pos_embed.resized).to(x.dtype)
        value_map, valid = to_canvas(x, grid)  # (B, D, H, W), (B, 1, H, W)
        height, width = value_map.shape[-2:]
        weights = adaptive_pool_weights(grid, self.side, height, width).to(x.dtype)  # (B, M, H*W)
        queries = weights @ value_map.flatten(2).transpose(1, 2)  # (B, M, D)
        for layer in self.layers:
            queries = layer(queries, self.query_pos, self.reference_points, value_map, valid, grid)
        out_grid = torch.full((batch, 2), self.side, dtype=torch.long, device=tokens.device)
        return BridgeOutput(self.readout(queries), out_grid, None)

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.full((grid.shape[0],), self.config.num_queries, dtype=torch.long, device=grid.device)
