"""Rotary position embedding (RoPE, Su et al., 2021): 2D for image tokens with explicit (row, col) position ids, 1D
(with the context-extension scalings public language models carry) for token sequences.

``Rope2d(head_dim)(position_ids (..., N, 2)) -> RopeTables(cos, sin)``, each (..., N, head_dim);
``apply_rope(x (B, heads, N, head_dim), tables) -> (B, heads, N, head_dim)``.

Layout (the one Qwen2-VL's vision tower uses, so its weights load unchanged): the rotate-half convention pairs
channel i with channel i + head_dim/2; of those head_dim/2 pairs, the first half turns with the token's row and the
second half with its column, each at frequencies theta^(-4k/head_dim), k = 0 .. head_dim/4 - 1. Position ids are an
input rather than derived from a grid, so packed sequences (NaViT), dropped patches and Qwen2-VL's merged windows
all use the same code.

``Rope1d(head_dim, theta, scaling, ...)(position_ids (B, T)) -> RopeTables`` (B, T, head_dim): the rotate-half layout
of Llama / Qwen2 over all head_dim channels; ``rope_inverse_frequency`` holds the scalings ("linear", "dynamic",
"llama3").
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

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


# --- 1D RoPE for token sequences (language models): position ids (B, T) -> tables (B, T, head_dim)

RopeScaling = Literal["none", "linear", "dynamic", "llama3"]


def rope_inverse_frequency(
    head_dim: int,
    theta: float = 10000.0,
    scaling: RopeScaling = "none",
    factor: float = 1.0,
    original_max_positions: int | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    seq_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32 of 1D RoPE and of the context-extension schemes public LMs carry.

    "linear": positions divided by ``factor`` (Chen et al., 2023, position interpolation). "dynamic": NTK-aware
    scaling of the base once ``seq_len`` (a scalar tensor, the largest position + 1) exceeds
    ``original_max_positions``; at or below it the plain frequencies come out unchanged. "llama3": Llama 3.1's
    wavelength-banded interpolation: long wavelengths divided by ``factor``, short ones kept, a smooth ramp between.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    if scaling == "dynamic":
        if seq_len is None or original_max_positions is None:
            return 1.0 / theta**exponents
        # The base grows with the context actually used; seq_len <= original gives exactly ``theta``.
        length = seq_len.detach().to("cpu", torch.float32).clamp_min(original_max_positions)
        base = theta * ((factor * length / original_max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base**exponents
    inverse = 1.0 / theta**exponents
    if scaling == "linear":
        return inverse / factor
    if scaling == "llama3":
        if original_max_positions is None:
            raise ValueError("llama3 RoPE scaling needs original_max_positions")
        low_wavelength = original_max_positions / low_freq_factor
        high_wavelength = original_max_positions / high_freq_factor
        wavelength = 2 * math.pi / inverse
        scaled = torch.where(wavelength > low_wavelength, inverse / factor, inverse)
        smooth = (original_max_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelength < high_wavelength) * ~(wavelength > low_wavelength)
        return torch.where(is_medium, smoothed, scaled)
    if scaling != "none":
        raise ValueError(f"unknown RoPE scaling {scaling!r}")
    return inverse


class Rope1d(nn.Module):
    """``Rope1d(head_dim, ...)(position_ids (B, T)) -> RopeTables`` of shape (B, T, head_dim), rotate-half layout
    (channel i pairs with i + head_dim/2, as Llama, Qwen2 and GPT-NeoX checkpoints expect)."""

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        scaling: RopeScaling = "none",
        factor: float = 1.0,
        original_max_positions: int | None = None,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.options = dict(
            theta=theta, scaling=scaling, factor=factor, original_max_positions=original_max_positions,
            low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
        )  # fmt: skip
        # A plain attribute, not a buffer: ``model.to(torch.bfloat16)`` must not round the frequencies, and a model
        # built on the meta device must not lose them. Moved to the positions' device on first use.
        self._inverse_frequency = rope_inverse_frequency(head_dim, **self.options)  # type: ignore[arg-type]

    def inverse_frequency(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.options["scaling"] == "dynamic":
            seq_len = position_ids.max() + 1
            return rope_inverse_frequency(self.head_dim, **self.options, seq_len=seq_len).to(position_ids.device)  # type: ignore[arg-type]
        if self._inverse_frequency.device != position_ids.device:
            self._inverse_frequency = self._inverse_frequency.to(position_ids.device)
        return self._inverse_frequency

    def forward(self, position_ids: torch.Tensor) -> RopeTables:
        angles = position_ids[..., None].float() * self.inverse_frequency(position_ids)  # (B, T, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim)
        return RopeTables(angles.cos(), angles.sin())
