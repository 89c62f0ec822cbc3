"""The bridge interface: vision tokens of a batch of images (of possibly different grids) -> language-model tokens.

Input: ``tokens`` (B, N, D_vis); ``grid`` (B, 2) long, each image's (rows, cols) of patch tokens; ``mask`` (B, N) bool,
True at real tokens, or None when every token is real. Images of different grids share a batch left-aligned: image
b's tokens come first in raster order (row by row), padding after, up to the batch's longest N.

Output: ``BridgeOutput`` with ``tokens`` (B, M, D_lm), the output ``grid`` (B, 2) where the output tokens form one
(a Q-Former's or a resampler's learned queries do not: None) and ``mask`` (B, M) where images of one batch get
different numbers of output tokens (None when all M are real). M may depend on the input grid. Positions the output
mask marks as padding hold zeros.

Every bridge is built by ``build_bridge(config, vision_dim, lm_dim)`` from its typed config and reports
``num_output_tokens(grid)``, the (B,) count of real output tokens per image, which a VLM needs before running the
bridge to lay out each image's placeholder tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class BridgeOutput:
    tokens: torch.Tensor  # (B, M, D_lm)
    grid: torch.Tensor | None  # (B, 2) long: (rows, cols) of the output tokens, None for learned queries
    mask: torch.Tensor | None  # (B, M) bool: True at real output tokens; None when all are real


class Bridge(nn.Module, ABC):
    """Base class of every bridge; ``config_class`` names its config, whose ``kind`` registers it."""

    config_class: ClassVar[type]
    config: Any

    @abstractmethod
    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> BridgeOutput:
        """tokens (B, N, D_vis), grid (B, 2) long, mask (B, N) bool or None -> ``BridgeOutput``."""

    @abstractmethod
    def num_output_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """(B,) long: how many real output tokens each image of ``grid`` (B, 2) gets."""
