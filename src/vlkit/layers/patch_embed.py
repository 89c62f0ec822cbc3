"""Patch embedding (Dosovitskiy et al., 2021): (B, C, H, W) -> (B, N, D) with N = (H/p) * (W/p).

Like a strided convolution, pixels past the last whole patch are ignored (SigLIP so400m: 384 px, 14 px patches).
The weight keeps the familiar Conv2d layout (D, C, p, p), but the product is computed as one matmul over
unfolded patches: it is exactly the same sum, and on CPU it avoids oneDNN's slow strided-convolution path.
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
