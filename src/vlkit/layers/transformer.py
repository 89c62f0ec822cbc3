"""Pre-norm transformer block shared by every tower: x + attn(norm(x)), x + mlp(norm(x)).

(B, N, D) -> (B, N, D). Optional layer scale (CaiT, used by EVA/ConvNeXt-style recipes) and stochastic depth
(Huang et al., 2016).
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.layers.attention import Attention
from vlkit.layers.mlp import build_mlp
from vlkit.layers.norms import build_norm
from vlkit.layers.rope import RopeTables


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability ``rate`` during training."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


# Width from which the block is compiled in training where the trainer compiles (``vlkit.train.compile``).
# bench/compile_step.py on a 2-core AMX Xeon: the CLIP ViT-B/16 step with its 768- and 512-wide blocks compiled
# 1.13x (fp32) and 1.19x (bf16) faster; shapes_siglip's 128-wide blocks 0.96x / 1.00x (bench/README.md).
COMPILE_MIN_DIM = 512


class TransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        act: str = "gelu",
        norm: str = "layernorm",
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = build_norm(norm, dim, norm_eps)  # type: ignore[arg-type]
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = build_norm(norm, dim, norm_eps)  # type: ignore[arg-type]
        self.mlp = build_mlp(dim, mlp_dim, act)
        self.scale1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.scale2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    @property
    def compile_in_training(self) -> bool:
        """Wide blocks are compiled in training (``COMPILE_MIN_DIM``): their norms, activation and residuals fuse."""
        return self.dim >= COMPILE_MIN_DIM

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False, rope: RopeTables | None = None
    ) -> torch.Tensor:
        x = x + self.drop_path(self.scale1(self.attn(self.norm1(x), mask=mask, is_causal=is_causal, rope=rope)))
        return x + self.drop_path(self.scale2(self.mlp(self.norm2(x))))
