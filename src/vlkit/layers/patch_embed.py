"""Patch embedding (Dosovitskiy et al., 2021): (B, C, H, W) -> (B, N, D) with N = (H/p) * (W/p).

Like a strided convolution, pixels past the last whole patch are ignored (SigLIP so400m: 384 px, 14 px patches).
The weight keeps the familiar Conv2d layout (D, C, p, p), but the product is computed as one matmul over
unfolded patches: it is exactly the same sum, and on CPU it avoids oneDNN's slow strided-convolution path.

``ConvStem`` replaces the single patchify projection by a stack of overlapping 3x3 stride-2 convolutions (Xiao et al.,
2021, "Early convolutions help transformers see better"): the same (B, N, D) tokens on the same grid, but each token
sees across its patch border. Trained from scratch on ShapesWorld it learns shape several times faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_channels: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        batch, channels, height, width = pixels.shape
        p = self.patch_size
        grid = (height // p, width // p)
        if height % p or width % p:
            pixels = pixels[:, :, : grid[0] * p, : grid[1] * p]
        patches = pixels.reshape(batch, channels, grid[0], p, grid[1], p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid[0] * grid[1], channels * p * p)  # (B, N, C*p*p)
        tokens = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, N, D)
        return tokens, grid


class ConvStem(nn.Module):
    """log2(p) stride-2 3x3 convolutions, GroupNorm(1) + GELU between them: (B, C, H, W) -> (B, N, D) on the
    (H // p, W // p) grid, like ``PatchEmbed``. ``widths`` are the hidden channel counts, one per conv but the last."""

    def __init__(self, patch_size: int, dim: int, widths: tuple[int, ...], in_channels: int = 3) -> None:
        super().__init__()
        num_convs = patch_size.bit_length() - 1
        if patch_size != 2**num_convs or len(widths) != num_convs - 1:
            raise ValueError(
                f"a conv stem needs a power-of-two patch_size and log2(patch_size) - 1 widths; got patch_size "
                f"{patch_size} and widths {widths}"
            )
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.GELU()]
            channels = width
        layers.append(nn.Conv2d(channels, dim, 3, stride=2, padding=1))
        self.convs = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        height, width = pixels.shape[2] // p * p, pixels.shape[3] // p * p
        features = self.convs(pixels[:, :, :height, :width])  # (B, D, H/p, W/p)
        return features.flatten(2).transpose(1, 2), (features.shape[2], features.shape[3])  # (B, N, D)
