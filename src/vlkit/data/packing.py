"""NaViT's "Patch n' Pack" (Dehghani et al., 2023): images at native aspect ratio -> patches -> packed sequences.

    image (3, H, W) --patchify--> PatchedImage: patches (n, p*p*3) + (row, col) of each + grid (rows, cols)
    [PatchedImage, ...] --drop_patches (training)--> fewer tokens per image, positions kept
    [PatchedImage, ...] --pack_images (first-fit into S sequences of L tokens)--> PackResult(PackedImages, kept)

``PackedImages`` (``vlkit.packed``) is what the ViT runs: patches (S, L, p*p*3), position ids (S, L, 2),
segment ids (S, L) (the image index, -1 at padding), per-image grids (I, 2), and as properties the image count of
every sequence and the batch's padding fraction. Patches are flattened (row, col, channel), as big_vision's and
transformers' SigLIP 2 processors do. ``size_for_max_patches`` picks an image's resolution from a per-image token
budget (SigLIP 2 NaFlex's rule); ``PackingCollate`` turns samples with variable-size pixels into packed batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlkit.layers import grid_positions
from vlkit.packed import PackedImages, kept_patch_count


@dataclass
class PatchedImage:
    patches: torch.Tensor  # (n, p*p*3)
    position_ids: torch.Tensor  # (n, 2) long (row, col)
    grid: tuple[int, int]  # (rows, cols) of the full image, whatever was dropped

    @property
    def num_tokens(self) -> int:
        return self.patches.shape[0]


@dataclass
class PackResult:
    packed: PackedImages
    kept: list[int]  # indices of the input images that were packed, ascending; packed image i is input kept[i]
    overflow: int  # images left out because the fixed number of sequences was full


def patchify(pixels: torch.Tensor, patch_size: int) -> PatchedImage:
    """(3, H, W) -> (rows*cols, p*p*3) patches in raster order; pixels past the last whole patch are cut off."""
    channels, height, width = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"a {height}x{width} image is smaller than one {patch_size}-pixel patch")
    pixels = pixels[:, : rows * patch_size, : cols * patch_size]
    patches = pixels.reshape(channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(1, 3, 2, 4, 0).reshape(rows * cols, patch_size * patch_size * channels)  # (n, p*p*C)
    return PatchedImage(patches, grid_positions((rows, cols)), (rows, cols))


def drop_patches(image: PatchedImage, rate: float, generator: torch.Generator | None = None) -> PatchedImage:
    """Keep a random ``1 - rate`` of the image's patches (at least one), in raster order, with their positions."""
    if rate == 0.0:
        return image
    count = kept_patch_count(image.num_tokens, rate)
    keep = torch.randperm(image.num_tokens, generator=generator)[:count].sort().values
    return PatchedImage(image.patches[keep], image.position_ids[keep], image.grid)


def first_fit(lengths: Sequence[int], capacity: int, max_bins: int | None = None) -> list[list[int]]:
    """Greedy first-fit: each item, in order, goes into the first bin with room, else a new bin. Items that fit no
    bin once ``max_bins`` are open are left out. Returns the item indices of every bin, ascending."""
    bins: list[list[int]] = []
    free: list[int] = []
    for item, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"image {item} has {length} tokens, more than the sequence length {capacity}; lower its "
                             "token budget or raise seq_len")  # fmt: skip
        target = next((number for number, room in enumerate(free) if room >= length), None)
        if target is None:
            if max_bins is not None and len(bins) >= max_bins:
                continue
            bins.append([])
            free.append(capacity)
            target = len(bins) - 1
        bins[target].append(item)
        free[target] -= length
    return bins


def pack_images(images: Sequence[PatchedImage], seq_len: int, num_sequences: int | None = None) -> PackResult:
    """First-fit-decreasing ``images`` into sequences of ``seq_len`` tokens: as many sequences as needed, or exactly
    ``num_sequences`` (fixed shapes; images that do not fit are left out and counted in ``overflow``).

    Largest images first: small ones then fill the gaps (1% padding where plain first-fit leaves 2-3% with 16-64
    token images in 256-token sequences). When sequences overflow, the smallest images are the ones left out."""
    if not images:
        raise ValueError("no images to pack")
    by_size = sorted(range(len(images)), key=lambda item: -images[item].num_tokens)  # stable: ties keep their order
    bins = first_fit([images[item].num_tokens for item in by_size], seq_len, num_sequences)
    bins = [sorted(by_size[position] for position in items) for items in bins]
    kept = sorted(item for items in bins for item in items)
    image_id = {item: number for number, item in enumerate(kept)}
    count = num_sequences if num_sequences is not None else len(bins)
    width = images[0].patches.shape[1]
    destinations, segments = [], []
    for sequence, items in enumerate(bins):
        offset = sequence * seq_len
        for item in items:
            length = images[item].num_tokens
            destinations.append(torch.arange(offset, offset + length))
            segments.append(torch.full((length,), image_id[item]))
            offset += length
    slots = torch.cat(destinations)
    order = [item for items in bins for item in items]  # the order of `destinations`
    patches = torch.zeros(count * seq_len, width, dtype=images[0].patches.dtype)
    patches[slots] = torch.cat([images[item].patches for item in order])
    position_ids = torch.zeros(count * seq_len, 2, dtype=torch.long)
    position_ids[slots] = torch.cat([images[item].position_ids for item in order])
    segment_ids = torch.full((count * seq_len,), -1, dtype=torch.long)
    segment_ids[slots] = torch.cat(segments)
    grids = torch.tensor([images[item].grid for item in kept], dtype=torch.long).reshape(-1, 2)
    packed = PackedImages(
        patches.view(count, seq_len, width),  # (S, L, p*p*3)
        position_ids.view(count, seq_len, 2),
        segment_ids.view(count, seq_len),
        grids,
    )
    return PackResult(packed, kept, len(images) - len(kept))


def size_for_max_patches(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(height, width), multiples of the patch, of the largest scaling of an image whose grid has at most
    ``max_patches`` patches: SigLIP 2 NaFlex's rule, including its bisection on the scale (so sizes match
    transformers' Siglip2ImageProcessor exactly). Each side is at least one patch."""

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high, tolerance = 1e-6, 100.0, 1e-5
    while high - low >= tolerance:
        middle = (low + high) / 2
        patches = (scaled(middle, height) / patch_size) * (scaled(middle, width) / patch_size)
        if patches <= max_patches:
            low = middle
        else:
            high = middle
    return scaled(low, height), scaled(low, width)


def resize_to_budget(pixels: torch.Tensor, patch_size: int, max_patches: int) -> torch.Tensor:
    """(3, H, W) -> (3, h, w) at the aspect ratio kept within ``max_patches`` patches (antialiased bilinear)."""
    height, width = size_for_max_patches(pixels.shape[1], pixels.shape[2], patch_size, max_patches)
    if (height, width) == tuple(pixels.shape[1:]):
        return pixels
    resized = F.interpolate(pixels[None].float(), size=(height, width), mode="bilinear", antialias=True)
    return resized[0].to(pixels.dtype)


@dataclass
class PackingCollate:
    """Samples ``{"pixels": (3, H, W), ...}`` of any sizes -> a packed batch dict.

    Output keys: ``patches``, ``position_ids``, ``segment_ids``, ``grids`` (``PackedImages.from_dict`` reads them),
    ``kept`` (long (I,): the sample indices packed), every other tensor or int field of the kept samples stacked
    (``input_ids``, ``attention_mask``, ...), ``overflow`` (int) and ``skipped`` (int, ``None`` samples).
    ``patch_dropout`` drops each image's patches before packing (use it in training only): sequences then hold more
    images for the same compute.
    """

    patch_size: int
    seq_len: int
    num_sequences: int | None = None
    patch_dropout: float = 0.0

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        present = [sample for sample in samples if sample is not None]
        if not present:
            raise ValueError("every sample of the batch was skipped; nothing to pack")
        images = [drop_patches(patchify(sample["pixels"], self.patch_size), self.patch_dropout) for sample in present]
        result = pack_images(images, self.seq_len, self.num_sequences)
        batch: dict[str, Any] = {**result.packed.as_dict(), "kept": torch.tensor(result.kept, dtype=torch.long)}
        for key, value in present[0].items():
            if key == "pixels":
                continue
            values = [present[item][key] for item in result.kept]
            if isinstance(value, torch.Tensor):
                batch[key] = torch.stack(values)
            elif isinstance(value, int):
                batch[key] = torch.tensor(values, dtype=torch.long)
        batch["overflow"] = result.overflow
        batch["skipped"] = len(samples) - len(present)
        return batch
