"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"), with NaViT's packed input.

pixels (B, 3, H, W) -> patch tokens (B, N, D) (+ class token) -> pre-norm transformer -> pooled (B, D).
The options cover the public variants vlkit loads: original ViT (class token, final norm on every token), OpenAI
CLIP (no patch bias, a norm before the blocks, final norm on the pooled token only, QuickGELU), SigLIP (no class
token, final norm, attention-pooling "MAP" head) and SigLIP 2 NaFlex (the learned table resized per image with
antialiased bilinear interpolation).

Packed input (NaViT, "Patch n' Pack", Dehghani et al., 2023): ``PackedImages`` holds the patches of images of any
aspect ratio and resolution packed into S sequences of L tokens, with each token's (row, col) and image index.
``forward_features`` runs it with a block-diagonal mask, so images never attend to each other, and ``forward_head``
pools one vector per image: (I, D), in image order. Position policies (``ViTConfig.pos_embed``): a learned table
("learned"), fixed sin-cos, none, NaViT's factorised row + column tables ("factorized"), or 2D RoPE ("rope2d").

Patch dropout (FLIP, Li et al., 2023; EVA-CLIP; NaViT's token dropping): in training, each image keeps a random
``1 - patch_dropout`` of its patch tokens (class tokens always stay). Batches of whole images drop inside the model;
packed batches are dropped by the packer before packing (``vlkit.data.packing``), so sequences fill with more images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigBase, register_config
from vlkit.encoders.base import EncoderOutput
from vlkit.layers import (
    AttentionPool,
    ConvStem,
    FactorizedPosEmbed2d,
    LearnedPosEmbed2d,
    PatchEmbed,
    Rope2d,
    RopeTables,
    TransformerBlock,
    grid_positions,
    sincos_2d,
    sincos_2d_at,
)
from vlkit.packed import PackedFeatures, PackedImages, kept_patch_count


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@register_config
@dataclass(frozen=True)
class ViTConfig(ConfigBase):
    """``image_size`` sets the reference grid of a learned table; ``max_grid`` the rows/columns the factorised
    tables cover (default: the larger side of that grid); ``pos_embed_interpolation`` how a learned table is resized
    to another grid."""

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
    stem: Literal["patch", "conv"] = "patch"
    stem_widths: tuple[int, ...] = (32, 64)
    class_token: bool = True
    pos_embed: Literal["learned", "sincos", "none", "factorized", "rope2d"] = "learned"
    pos_embed_interpolation: Literal["bicubic", "bilinear_antialias"] = "bicubic"
    max_grid: int | None = None
    rope_theta: float = 10000.0
    pre_norm: bool = False
    final_norm: Literal["tokens", "pooled", "none"] = "tokens"
    pool: Literal["cls", "mean", "map", "none"] = "cls"
    layer_scale: float | None = None
    drop_path: float = 0.0
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(_pair(self.image_size)) < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.pos_embed == "rope2d" and (self.dim // self.num_heads) % 4:
            raise ValueError(f"pos_embed='rope2d' needs a head_dim divisible by 4, got {self.dim // self.num_heads}")
        if self.stem == "conv" and 2 ** len(self.stem_widths) * 2 != self.patch_size:
            raise ValueError(
                f"stem='conv' with patch_size {self.patch_size} needs log2(patch_size) - 1 stem_widths, "
                f"got {self.stem_widths}"
            )
        if self.max_grid is not None and self.max_grid < 1:
            raise ValueError(f"max_grid must be positive, got {self.max_grid}")

    @property
    def grid(self) -> tuple[int, int]:
        height, width = _pair(self.image_size)
        return height // self.patch_size, width // self.patch_size

    def hidden_state(self, layer: int, what: str) -> int:
        """``layer`` in transformers' ``hidden_states`` numbering (0 the embedding, k block k's output, negative from
        the end) as 0..depth; ``what`` names it in the error when the tower has no such state."""
        if not -self.depth - 1 <= layer <= self.depth:
            raise ValueError(f"{what} is outside the tower's hidden states 0..{self.depth} (or -{self.depth + 1}..-1)")
        return layer % (self.depth + 1)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embed: PatchEmbed | ConvStem = (
            ConvStem(config.patch_size, dim, config.stem_widths)
            if config.stem == "conv"
            else PatchEmbed(config.patch_size, dim, bias=config.patch_bias)
        )
        self.num_prefix_tokens = int(config.class_token)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        if self.class_token is not None:
            nn.init.trunc_normal_(self.class_token, std=0.02)
        self.pos_embed: LearnedPosEmbed2d | FactorizedPosEmbed2d | None = None
        if config.pos_embed == "learned":
            self.pos_embed = LearnedPosEmbed2d(
                config.grid, dim, self.num_prefix_tokens, interpolation=config.pos_embed_interpolation
            )
        elif config.pos_embed == "factorized":
            side = config.max_grid or max(config.grid)
            self.pos_embed = FactorizedPosEmbed2d((side, side), dim)
        self.rope = Rope2d(dim // config.num_heads, config.rope_theta) if config.pos_embed == "rope2d" else None
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
        if isinstance(self.pos_embed, FactorizedPosEmbed2d):
            tokens = tokens + self.pos_embed.grid(grid)
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        if isinstance(self.pos_embed, LearnedPosEmbed2d):
            tokens = tokens + self.pos_embed(grid)
        elif self.config.pos_embed == "sincos":
            table = sincos_2d(grid, self.config.dim).to(tokens)
            tokens = torch.cat([tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :] + table], 1)
        return tokens, grid

    def forward_features(
        self, pixels: torch.Tensor | PackedImages, layer: int | tuple[int, ...] | None = None
    ) -> EncoderOutput | PackedFeatures:
        """(B, 3, H, W) -> ``EncoderOutput`` (B, N, D); ``PackedImages`` -> ``PackedFeatures`` (S, L, D).

        With patch dropout in training, N counts the kept tokens, not the grid's h*w. ``layer`` returns an
        intermediate hidden state instead, numbered as transformers' ``hidden_states``: 0 is the embedding (after any
        pre-norm), k the output of block k, negative counts from the end; no final norm (what LLaVA's
        ``vision_feature_layer`` selects). Several layers (a tuple) come concatenated along the features, in the
        order given (B, N, D x layers), from one pass, as transformers' LLaVA does with a list.
        """
        if isinstance(pixels, PackedImages):
            if layer is not None:
                raise ValueError("packed inputs return the last layer only")
            return self._forward_packed(pixels)
        tokens, grid = self.embed(pixels)
        keep = None
        if self.training and self.config.patch_dropout > 0.0:
            tokens, keep = self._drop_patches(tokens)
        rope = self._grid_rope(grid, keep, tokens.device) if self.rope is not None else None
        tokens = self.norm_pre(tokens)
        depth = len(self.blocks)
        layers = (layer,) if isinstance(layer, int) else layer or ()
        if layer is not None and not layers:
            raise ValueError("layer: an empty tuple of hidden states")
        wanted = [self.config.hidden_state(index, f"layer {index}") for index in layers]
        hidden = {0: tokens} if 0 in wanted else {}  # only the requested states are kept
        for k, block in enumerate(self.blocks[: max(wanted, default=depth)], start=1):
            tokens = block(tokens, rope=rope)
            if k in wanted:
                hidden[k] = tokens
        if layer is None:
            if self.config.final_norm == "tokens":
                tokens = self.norm(tokens)
        else:
            tokens = torch.cat([hidden[k] for k in wanted], dim=-1) if len(wanted) > 1 else hidden[wanted[0]]
        return EncoderOutput(tokens, grid, self.num_prefix_tokens)

    def forward_head(self, features: EncoderOutput | PackedFeatures) -> torch.Tensor:
        """Pooled (B, D) for whole images; (I, D) in image order for packed ones."""
        if isinstance(features, PackedFeatures):
            pooled = self._pool_packed(features)
        else:
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
        return pooled

    def forward(self, pixels: torch.Tensor | PackedImages) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))

    # --- patch dropout and RoPE for whole images

    def _drop_patches(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - patch_dropout`` of each image's patch tokens, in raster order; prefix tokens stay.

        Returns the tokens (B, prefix + kept, D) and the kept patch indices (B, kept).
        """
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        batch, num_patches, dim = patches.shape
        count = kept_patch_count(num_patches, self.config.patch_dropout)
        scores = torch.rand(batch, num_patches, device=tokens.device)
        keep = scores.topk(count, dim=1).indices.sort(dim=1).values  # (B, kept)
        patches = patches.gather(1, keep[..., None].expand(-1, -1, dim))  # (B, kept, D)
        return torch.cat([prefix, patches], dim=1), keep

    def _grid_rope(self, grid: tuple[int, int], keep: torch.Tensor | None, device: torch.device) -> RopeTables:
        assert self.rope is not None
        positions = grid_positions(grid, device)  # (N, 2)
        positions = positions[keep] if keep is not None else positions[None]  # (B or 1, N', 2)
        cos, sin = self.rope(positions)
        if self.num_prefix_tokens:
            # Class tokens sit at no position: an identity rotation (cos 1, sin 0), so they stay position-free.
            shape = (cos.shape[0], self.num_prefix_tokens, cos.shape[-1])
            cos = torch.cat([cos.new_ones(shape), cos], dim=1)
            sin = torch.cat([sin.new_zeros(shape), sin], dim=1)
        return RopeTables(cos, sin)

    # --- packed sequences

    def _forward_packed(self, packed: PackedImages) -> PackedFeatures:
        if self.class_token is not None:
            raise ValueError("packed inputs need a ViT without a class token (class_token=False)")
        if not isinstance(self.patch_embed, PatchEmbed):
            # Packed patches are cut apart before the encoder sees them; overlapping convolutions need whole images.
            raise ValueError("packed inputs need stem='patch': a conv stem looks across patch borders")
        proj = self.patch_embed.proj
        # The conv weight (D, C, p, p) reordered to the packed patches' (row, col, channel) flattening.
        weight = proj.weight.permute(0, 2, 3, 1).flatten(1)  # (D, p*p*C)
        if packed.patches.shape[-1] != weight.shape[1]:
            raise ValueError(f"packed patches have {packed.patches.shape[-1]} values, this ViT's "
                             f"{self.config.patch_size}-pixel RGB patches need {weight.shape[1]}")  # fmt: skip
        tokens = F.linear(packed.patches.to(weight.dtype), weight, proj.bias)  # (S, L, D)
        positions = packed.position_ids
        policy = self.config.pos_embed
        rope = None
        if isinstance(self.pos_embed, LearnedPosEmbed2d):
            tokens = tokens + self.pos_embed.packed(positions, packed.segment_ids, packed.grids).to(tokens.dtype)
        elif isinstance(self.pos_embed, FactorizedPosEmbed2d):
            limit = torch.tensor(self.pos_embed.max_grid, device=positions.device)
            if bool((positions >= limit).any()):
                raise ValueError(f"packed positions exceed the factorised tables' {self.pos_embed.max_grid}; "
                                 "raise ViTConfig.max_grid")  # fmt: skip
            tokens = tokens + self.pos_embed(positions)
        elif policy == "sincos":
            tokens = tokens + sincos_2d_at(positions, self.config.dim).to(tokens.dtype)
        elif self.rope is not None:
            rope = self.rope(positions)
        mask = packed.attention_mask()  # built once, shared by every block
        tokens = self.norm_pre(tokens)
        for block in self.blocks:
            tokens = block(tokens, mask=mask, rope=rope)
        if self.config.final_norm == "tokens":
            tokens = self.norm(tokens)
        return PackedFeatures(tokens, packed.segment_ids, packed.grids)

    def _pool_packed(self, features: PackedFeatures) -> torch.Tensor:
        pool = self.config.pool
        if pool == "mean":
            tokens = features.tokens.flatten(0, 1)  # (S*L, D)
            segment = features.segment_ids.flatten()
            real = (segment >= 0).to(tokens.dtype)
            image = segment.clamp(min=0)  # padding adds zeros to image 0
            sums = tokens.new_zeros(features.num_images, tokens.shape[-1]).index_add_(0, image, tokens * real[:, None])
            counts = tokens.new_zeros(features.num_images).index_add_(0, image, real)
            return sums / counts[:, None]  # (I, D)
        if pool == "map":
            assert self.head is not None
            tokens, valid = features.per_image()  # (I, n_max, D), (I, n_max)
            return self.head(tokens, mask=valid[:, None, None, :])[:, 0]  # (I, D)
        raise ValueError(f"packed inputs pool per image with pool='mean' or 'map', not {pool!r}")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
