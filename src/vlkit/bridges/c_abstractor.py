"""Honeybee's C-Abstractor (Cha et al., 2023, "Honeybee: Locality-enhanced Projector for Multimodal LLM"): residual
convolution blocks on the token grid, adaptive average pooling to sqrt(M) x sqrt(M), more residual blocks, and an
MLP readout — a projector whose number of output tokens is free and which keeps the image's local structure.

tokens (B, N, D_vis) on per-image (rows, cols) grids -> (B, M, D_lm) on a fixed (sqrt M, sqrt M) grid. The blocks
are timm's RegNet bottleneck as Honeybee configures it (SiLU, LayerNorm2d, depthwise 3x3, squeeze-excite), ``depth``
of them before and after the pooling; the readout is Honeybee's MLP (Linear, then SiLU + Linear ``mlp_depth - 1``
times). An optional learned position table is added to the input tokens, resized to each image's grid.

Images of different grids share one batch on a zero-padded canvas (``bridges.grid.to_canvas``): the padding is reset
to zero before every spatial convolution, the squeeze-excite mean and the pooling average over each image's own
positions only, so each image's output equals its output alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vlkit.bridges.base import Bridge, BridgeOutput
from vlkit.bridges.grid import adaptive_pool_weights, check_grid, check_square, per_image_tables, to_canvas
from vlkit.config import ConfigBase, register_config
from vlkit.layers.norms import LayerNorm2d
from vlkit.layers.pos_embed import LearnedPosEmbed2d


@register_config
@dataclass(frozen=True)
class CAbstractorConfig(ConfigBase):
    """``dim``: the blocks' width (Honeybee's ``hidden_size``); ``depth``: RegNet blocks before and after pooling;
    ``pos_embed_grid``: the reference grid of a learned position table added to the input (Honeybee: the encoder's
    grid), None for no table."""

    kind: ClassVar[str] = "c_abstractor"

    num_queries: int = 144
    dim: int = 1024
    depth: int = 3
    mlp_depth: int = 2
    se_ratio: float = 0.25
    pos_embed_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_square(self.num_queries, "C-Abstractor")
        if self.depth < 0 or self.mlp_depth < 1:
            raise ValueError(f"C-Abstractor needs depth >= 0 and mlp_depth >= 1, got {self.depth}, {self.mlp_depth}")


def honeybee_readout(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """Honeybee's readout MLP: Linear(in, out), then (SiLU, Linear(out, out)) ``depth - 1`` times."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel gate from the mean over each image's valid positions (Hu et al., 2018)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            mean = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        else:
            mean = (x * valid).sum((2, 3), keepdim=True) / valid.sum((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(mean))))


class RegNetBlock(nn.Module):
    """timm's RegNet bottleneck with Honeybee's settings: 1x1 conv, depthwise 3x3 conv, squeeze-excite (width
    ``se_ratio`` x the block's input), 1x1 conv, each conv without bias and followed by LayerNorm2d (SiLU after the
    first two); the shortcut is a 1x1 conv + norm when the width changes; SiLU after the sum.

    (B, C_in, H, W) -> (B, C_out, H, W); ``valid`` (B, 1, H, W) marks each image's positions on a padded canvas.
    """

    def __init__(self, in_dim: int, out_dim: int, se_ratio: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.norm1 = LayerNorm2d(out_dim, eps=1e-6)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim, bias=False)
        self.norm2 = LayerNorm2d(out_dim, eps=1e-6)
        se_dim = round(in_dim * se_ratio)
        self.se = SqueezeExcite(out_dim, se_dim) if se_dim else None
        self.conv3 = nn.Conv2d(out_dim, out_dim, 1, bias=False)
        self.norm3 = LayerNorm2d(out_dim, eps=1e-6)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), LayerNorm2d(out_dim, eps=1e-6))
            if in_dim != out_dim
            else nn.Identity()
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act(self.norm1(self.conv1(x)))
        if valid is not None:
            # The norm's bias made the padding non-zero; the 3x3 conv must see zeros there, as at the image's edge.
            x = x * valid
        x = self.act(self.norm2(self.conv2(x)))
        if self.se is not None:
            x = self.se(x, valid)
        x = self.act(self.norm3(self.conv3(x)) + shortcut)
        return x if valid is None else x * valid


class CAbstractor(Bridge):
    config_class = CAbstractorConfig

    def __init__(self, config: CAbstractorConfig, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        self.side = math.isqrt(config.num_queries)
        self.pos_embed = LearnedPosEmbed2d(config.pos_embed_grid, vision_dim) if config.pos_embed_grid else None
        widths = [vision_dim] + [config.dim] * config.depth
        self.pre_blocks = nn.ModuleList(
            RegNetBlock(widths[i], widths[i + 1], config.se_ratio) for i in range(config.depth)
        )
        width = widths[-1]
        self.post_blocks = nn.ModuleList(RegNetBlock(width, width, config.se_ratio) for _ in range(config.depth))
        self.readout = honeybee_readout(width, lm_dim, config.mlp_depth)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        grid = check_grid(tokens, grid, mask, "C-Abstractor")
        batch, length, _ = tokens.shape
        if self.pos_embed is not None:
            tokens = tokens + per_image_tables(grid, length, self.pos_embed.resized).to(tokens.dtype)
        canvas, valid = to_canvas(tokens, grid)  # (B, D, H, W), (B, 1, H, W)
        for block in self.pre_blocks:
            canvas = block(canvas, valid)
        height, width = canvas.shape[-2:]
        weights = adaptive_pool_weights(grid, self.side, height, width).to(canvas.dtype)  # (B, M, H*W)
        pooled = weights @ canvas.flatten(2).transpose(1, 2)  # (B, M, C)
        x = pooled.transpose(1, 2).reshape(batch, -1, self.side, self.side)  # (B, C, s, s)
        for block in self.post_blocks:
            x = block(x)
        out = self.readout(x.flatten(2).transpose(1, 2))  # (B, M, D_lm)
        out_grid = torch.full((batch, 2), self.side, dtype=torch.long, device=tokens.device)
        return BridgeOutput(out, out_grid, None)

    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.full((grid.shape[0],), self.config.num_queries, dtype=torch.long, device=grid.device)
