"""Packed images (NaViT, "Patch n' Pack", Dehghani et al., 2023): the types data, encoders and models share.

A leaf module (it imports only torch and ``vlkit.layers``), so that the data pipeline that packs images never imports
an encoder: ``PackedImages`` is what the packing collate builds and the ViT runs; ``PackedFeatures`` is what the
ViT returns for it.

    PackedImages: patches (S, L, p*p*3), position_ids (S, L, 2), segment_ids (S, L), grids (I, 2)
    PackedFeatures: tokens (S, L, D), segment_ids (S, L), grids (I, 2) -> per_image() (I, n_max, D) + mask
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlkit.layers import segment_mask

__all__ = ["PackedFeatures", "PackedImages", "kept_patch_count"]


@dataclass
class PackedImages:
    """I images packed into S sequences of L tokens (NaViT). Patches are flattened (row, col, channel) within the
    patch, the layout of big_vision and transformers' Siglip2ImageProcessor, so their ``pixel_values`` are input as
    they are."""

    patches: torch.Tensor  # (S, L, p*p*3)
    position_ids: torch.Tensor  # (S, L, 2) long: (row, col) of the token in its image's grid; 0 at padding
    segment_ids: torch.Tensor  # (S, L) long: index of the token's image in 0..I-1; -1 at padding
    grids: torch.Tensor  # (I, 2) long: (rows, cols) of each image's full patch grid, in image order

    @property
    def num_images(self) -> int:
        return self.grids.shape[0]

    @property
    def images_per_sequence(self) -> torch.Tensor:
        """(S,) long: how many images each sequence holds."""
        present = torch.zeros(self.segment_ids.shape[0], self.num_images + 1, device=self.segment_ids.device)
        present.scatter_(1, torch.where(self.segment_ids < 0, self.num_images, self.segment_ids), 1.0)
        return present[:, : self.num_images].sum(dim=1).long()

    @property
    def padding_fraction(self) -> torch.Tensor:
        """Scalar: the share of the S x L token slots that hold padding."""
        return (self.segment_ids < 0).float().mean()

    def attention_mask(self) -> torch.Tensor:
        """(S, 1, L, L) boolean block-diagonal mask: True where query and key belong to the same image."""
        return segment_mask(self.segment_ids)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"patches": self.patches, "position_ids": self.position_ids, "segment_ids": self.segment_ids,
                "grids": self.grids}  # fmt: skip

    @classmethod
    def from_dict(cls, batch: dict[str, torch.Tensor]) -> PackedImages:
        return cls(batch["patches"], batch["position_ids"], batch["segment_ids"], batch["grids"])

    @classmethod
    def from_padded(
        cls, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> PackedImages:
        """One image per sequence, from transformers' Siglip2ImageProcessor output: ``pixel_values`` (B, L, p*p*3),
        ``pixel_attention_mask`` (B, L) with 1 on the first rows*cols tokens, ``spatial_shapes`` (B, 2)."""
        batch, length = pixel_attention_mask.shape
        index = torch.arange(length, device=pixel_values.device)[None]  # (1, L)
        cols = spatial_shapes[:, 1:].to(index.device)  # (B, 1)
        valid = pixel_attention_mask.bool()
        images = torch.arange(batch, device=index.device)[:, None].expand(batch, length)
        segment_ids = torch.where(valid, images, -1)
        position_ids = torch.stack([index // cols, index % cols], dim=-1) * valid[..., None]  # (B, L, 2)
        return cls(pixel_values, position_ids, segment_ids, spatial_shapes.long())


@dataclass
class PackedFeatures:
    """``tokens`` (S, L, D) of packed images after the encoder, with the segment ids and grids they came with."""

    tokens: torch.Tensor
    segment_ids: torch.Tensor
    grids: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.grids.shape[0]

    def per_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's tokens gathered into (I, n_max, D), in sequence order, and the (I, n_max) mask of real ones."""
        segment = self.segment_ids.flatten()  # (S*L,)
        num_images = self.num_images
        key = torch.where(segment < 0, num_images, segment)
        order = torch.argsort(key, stable=True)  # token slots grouped by image, padding last
        counts = torch.bincount(key, minlength=num_images + 1)[:num_images]  # (I,)
        starts = counts.cumsum(0) - counts
        longest = int(counts.max())
        offsets = torch.arange(longest, device=segment.device)
        valid = offsets[None] < counts[:, None]  # (I, n_max)
        slots = order[torch.where(valid, starts[:, None] + offsets[None], 0)]  # (I, n_max)
        # index_select: its backward adds repeated slots (the padding's) in a fixed order, advanced indexing's does not
        tokens = self.tokens.flatten(0, 1).index_select(0, slots.flatten()).view(*slots.shape, self.tokens.shape[-1])
        return tokens, valid


def kept_patch_count(num_patches: int, rate: float) -> int:
    """How many of an image's patches survive patch dropout at ``rate``: at least one (as in FLIP and timm)."""
    return max(1, int(num_patches * (1.0 - rate)))
