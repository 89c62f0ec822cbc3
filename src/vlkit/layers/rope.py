"""2D rotary position embedding (RoPE, Su et al., 2021) for image tokens with explicit (row, col) position ids.

``Rope2d(head_dim)(position_ids (..., N, 2)) -> RopeTables(cos, sin)``, each (..., N, head_dim);
``apply_rope(x (B, heads, N, head_dim), tables) -> (B, heads, N, head_dim)``.

Layout (the one Qwen2-VL's vision tower uses, so its weights load unchanged): the rotate-half convention pairs
channel i with channel i + head_dim/2; of those head_dim/2 pairs, the first half turns with the token's row and the
second half with its column, each at frequencies theta^(-4k/head_dim), k = 0 .. head_dim/4 - 1. Position ids are an
input rather than derived from a grid, so packed sequences (NaViT), dropped patches and Qwen2-VL's merged windows
all use the same code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class RopeTables(NamedTuple):
    cos: torch.Tensor  # (..., N, head_dim) float32
    sin: torch.Tensor  # (..., N, head_dim) float32


class Rope2d(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        half = head_dim // 2
        inverse_frequency = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # (head_dim/4,)
        # Not persistent: it is a function of head_dim and theta, and checkpoints of other formats do not hold it.
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> RopeTables:
        """``position_ids`` (..., N, 2) integer (row, col) -> cos/sin tables (..., N, head_dim)."""
        if position_ids.shape[-1] != 2:
            raise ValueError(f"position_ids must end in (row, col), got shape {tuple(position_ids.shape)}")
        angles = position_ids.float()[..., None] * self.inverse_frequency  # (..., N, 2, head_dim/4)
        angles = angles.flatten(-2)  # (..., N, head_dim/2): row frequencies, then column frequencies
        angles = torch.cat([angles, angles], dim=-1)  # (..., N, head_dim)
        return RopeTables(angles.cos(), angles.sin())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate queries or keys (B, heads, N, head_dim) by tables of shape (B or 1, N, head_dim).

    The rotation runs in fp32 or wider (angles of far positions lose their low bits in bf16); returns x's dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = tables.cos.unsqueeze(-3).to(dtype), tables.sin.unsqueeze(-3).to(dtype)  # (B, 1, N, head_dim)
    wide = x.to(dtype)
    return (wide * cos + _rotate_half(wide) * sin).to(x.dtype)
