"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words").

pixels (B, 3, H, W) -> patch tokens (B, N, D) (+ class token) -> pre-norm transformer -> pooled (B, D).
The options cover the public variants vlkit loads: original ViT (class token, final norm on every token), OpenAI
CLIP (no patch bias, a norm before the blocks, final norm on the pooled token only, QuickGELU) and SigLIP (no class
token, final norm, attention-pooling "MAP" head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from vlkit.config import ConfigBase, register_config
from vlkit.encoders.base import EncoderOutput
from vlkit.layers import AttentionPool, LearnedPosEmbed2d, PatchEmbed, TransformerBlock, sincos_2d


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@register_config
@dataclass(frozen=True)
class ViTConfig(ConfigBase):
    kind: ClassVar[str] = "vit"

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    act: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    patch_bias: bool = True
    class_token: bool = True
    pos_embed: Literal["learned", "sincos", "none"] = "learned"
    pre_norm: bool = False
    final_norm: Literal["tokens", "pooled", "none"] = "tokens"
    pool: Literal["cls", "mean", "map", "none"] = "cls"
    layer_scale: float | None = None
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if min(_pair(self.image_size)) < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True")

    @property
    def grid(self) -> tuple[int, int]:
        height, width = _pair(self.image_size)
        return height // self.patch_size, width // self.patch_size


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embed = PatchEmbed(config.patch_size, dim, bias=config.patch_bias)
        self.num_prefix_tokens = int(config.class_token)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        if self.class_token is not None:
            nn.init.trunc_normal_(self.class_token, std=0.02)
        self.pos_embed = (
            LearnedPosEmbed2d(config.grid, dim, self.num_prefix_tokens) if config.pos_embed == "learned" else None
        )
        self.norm_pre = nn.LayerNorm(dim, eps=config.norm_eps) if config.pre_norm else nn.Identity()
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                config.num_heads,
                config.mlp_dim,
                act=config.act,
                norm=config.norm,
                norm_eps=config.norm_eps,
                qkv_bias=config.qkv_bias,
                layer_scale=config.layer_scale,
                drop_path=rate,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.final_norm != "none" else nn.Identity()
        self.head = (
            AttentionPool(dim, config.num_heads, config.mlp_dim, act=config.act, norm_eps=config.norm_eps)
            if config.pool == "map"
            else None
        )
        self.apply(_init_weights)

    @property
    def dim(self) -> int:
        return self.config.dim

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = self.patch_embed(pixels)  # (B, N, D)
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed(grid)
        elif self.config.pos_embed == "sincos":
            table = sincos_2d(grid, self.config.dim).to(tokens)
            tokens = torch.cat([tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :] + table], 1)
        return tokens, grid

    def forward_features(self, pixels: torch.Tensor) -> EncoderOutput:
        tokens, grid = self.embed(pixels)
        tokens = self.norm_pre(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        if self.config.final_norm == "tokens":
            tokens = self.norm(tokens)
        return EncoderOutput(tokens, grid, self.num_prefix_tokens)

    def forward_head(self, features: EncoderOutput) -> torch.Tensor:
        tokens = features.tokens
        pool = self.config.pool
        if pool == "cls":
            pooled = tokens[:, 0]
        elif pool == "mean":
            pooled = features.patch_tokens.mean(dim=1)
        elif pool == "map":
            assert self.head is not None
            pooled = self.head(tokens)[:, 0]
        else:
            raise ValueError("this ViT has pool='none': use forward_features")
        if self.config.final_norm == "pooled":
            pooled = self.norm(pooled)
        return pooled  # (B, D)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
