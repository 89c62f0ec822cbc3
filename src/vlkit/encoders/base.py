"""The encoder interface's output type."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    """``tokens`` (B, N, D) after the encoder (class token first when present); ``grid`` (h, w) of the patch tokens."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    num_prefix_tokens: int = 0

    @property
    def patch_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.num_prefix_tokens :]
