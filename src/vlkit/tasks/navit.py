"""NaViT (Dehghani et al., 2023): the contrastive task's packed input adapter and its square baselines.

    records --ImageTextDataset(NativeTransform())--> pixels (3, H, W) at native size + token ids
            --NaViTDataset--> pixels resized to a per-image token budget, aspect ratio kept
            --PackingCollate--> packed batch dict --navit_step(loss_fn)--> StepOutput (logs padding_fraction)

``input_policies`` sets up the comparison behind the paper's claim at equal compute: every policy fills the same
number of token slots per batch (S sequences x L tokens); "pack" keeps native aspect ratios and packs, the others
resize ("resize_square") or letterbox ("pad_square") every image to one square of at most L patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vlkit.data.images import to_rgb
from vlkit.data.packing import PackingCollate, resize_to_budget
from vlkit.data.readers import collate_image_text
from vlkit.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from vlkit.packed import PackedImages
from vlkit.train import StepOutput, distributed

InputPolicy = Literal["pack", "resize_square", "pad_square"]
StepFn = Callable[[torch.nn.Module, dict[str, Any]], StepOutput]

# 8-pixel patches, at most 64 patches per image (the square policies' 8 x 8 grid), sequences of 64 tokens.
PATCH_SIZE = 8
MAX_PATCHES = 64
MIN_PATCHES = 16


@dataclass(frozen=True)
class NativeTransform:
    """RGB image -> normalised float tensor (3, H, W) at the image's own size (the packer resizes later)."""

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(to_rgb(image), dtype=np.uint8)  # (H, W, 3)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


class NaViTDataset(torch.utils.data.Dataset):
    """Wraps a dataset of dicts with ``"pixels"`` (3, H, W): each image is resized, aspect ratio kept, to a token
    budget of ``max_patches`` patches, or to one drawn per image from ``(low, high)`` (NaViT's per-image resolution
    sampling). The draw is a pure function of (seed, epoch, index), so a resumed run sees the same sizes."""

    def __init__(
        self, base: torch.utils.data.Dataset, patch_size: int, max_patches: int | tuple[int, int], seed: int = 0
    ) -> None:
        low, high = (max_patches, max_patches) if isinstance(max_patches, int) else max_patches
        if not 1 <= low <= high:
            raise ValueError(f"max_patches must be positive with low <= high, got {max_patches}")
        self.base = base
        self.patch_size = patch_size
        self.budget = (low, high)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.base[index]
        if sample is None:  # a bad item the base dataset chose to skip
            return None
        low, high = self.budget
        generator = np.random.default_rng([self.seed, self.epoch, index])
        budget = low if low == high else int(generator.integers(low, high + 1))
        return {**sample, "pixels": resize_to_budget(sample["pixels"], self.patch_size, budget)}


def navit_step(loss_fn: torch.nn.Module) -> StepFn:
    """Like ``contrastive_step``, for a packed batch dict from ``PackingCollate``; also logs how full it was."""

    def step(model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        packed = PackedImages.from_dict(batch)
        out = model(packed, batch["input_ids"], batch["attention_mask"])
        images, texts = out.image_features, out.text_features
        if distributed.get_world_size() > 1:
            # Each rank packs its own share and keeps the images that fit: the counts differ, and the sharded losses
            # pair equal shards. Every rank trains on the first (fewest kept) of its pairs.
            kept = int(distributed.all_reduce(torch.tensor(images.shape[0], device=images.device), op="min"))
            images, texts = images[:kept], texts[:kept]
        loss = loss_fn(images, texts, out.logit_scale, out.logit_bias)
        metrics = {
            "logit_scale": float(out.logit_scale.detach()),
            "padding_fraction": float(packed.padding_fraction),
            "images_per_sequence": float(packed.images_per_sequence.float().mean()),
            "overflow": float(batch.get("overflow", 0)),
        }
        if out.logit_bias is not None:
            metrics["logit_bias"] = float(out.logit_bias.detach())
        return StepOutput(loss=loss, metrics=metrics)

    return step


@dataclass(frozen=True)
class InputPolicySetup:
    """Everything that differs between the input policies; the model, loss and optimiser stay the same.

    Build the dataset as ``wrap_dataset(ImageTextDataset(records, transform, ...))``, load it with
    ``samples_per_batch`` samples per batch and ``collate_fn``, and train with ``step_fn(loss_fn)``.
    ``token_slots`` (sequences x tokens per batch) is the same for every policy: that is the equal compute.
    """

    policy: InputPolicy
    transform: Callable[[Image.Image], torch.Tensor]
    wrap_dataset: Callable[[torch.utils.data.Dataset], torch.utils.data.Dataset]
    collate_fn: Callable[[list[Any]], dict[str, Any]]
    step_fn: Callable[[torch.nn.Module], StepFn]
    samples_per_batch: int
    token_slots: int


def input_policy(
    policy: InputPolicy,
    num_sequences: int,
    patch_size: int = PATCH_SIZE,
    max_patches: int = MAX_PATCHES,
    min_patches: int | None = None,
    oversample: float = 1.0,
    patch_dropout: float = 0.0,
    seed: int = 0,
    seq_len: int | None = None,
) -> InputPolicySetup:
    """One of the three policies at ``num_sequences`` x ``max_patches`` token slots per batch.

    "pack": native aspect ratio within ``max_patches`` patches (a per-image budget drawn from
    [``min_patches``, ``max_patches``] when given), first-fit into ``num_sequences`` sequences of ``max_patches``
    tokens; ``oversample`` > 1 draws that many more samples per batch than sequences, so sequences left part-empty
    by smaller images fill up (images that do not fit are dropped and logged as ``overflow``). ``patch_dropout``
    drops tokens before packing (NaViT's token dropping: more images per batch at the same compute). ``seq_len``
    (default ``max_patches``) packs the same token slots into fewer, longer sequences: with several images per
    sequence, first-fit-decreasing leaves far less padding (NaViT packs into long sequences).
    "resize_square" / "pad_square": one square image of side ``floor(sqrt(max_patches))`` patches, squashed or
    letterboxed, one image per sequence, trained with the contrastive task's square-image step.
    """
    side = math.isqrt(max_patches)
    slots = num_sequences * max_patches
    if policy == "pack":
        budget = (min_patches, max_patches) if min_patches is not None else max_patches
        seq_len = seq_len or max_patches
        if seq_len < max_patches or slots % seq_len:
            raise ValueError(f"seq_len {seq_len} must be >= max_patches ({max_patches}) and divide the {slots} token "
                             f"slots of {num_sequences} x {max_patches}")  # fmt: skip
        collate = PackingCollate(patch_size, seq_len, slots // seq_len, patch_dropout)
        return InputPolicySetup(
            policy=policy,
            transform=NativeTransform(),
            wrap_dataset=lambda base: NaViTDataset(base, patch_size, budget, seed),
            collate_fn=collate,
            step_fn=navit_step,
            samples_per_batch=max(num_sequences, round(num_sequences * oversample)),
            token_slots=slots,
        )
    if policy not in ("resize_square", "pad_square"):
        raise ValueError(f"unknown input policy {policy!r}; known: pack, resize_square, pad_square")
    # Imported here: the contrastive task imports this module for its packed inputs.
    from vlkit.tasks.contrastive import contrastive_step

    mode = "squash" if policy == "resize_square" else "pad"
    return InputPolicySetup(
        policy=policy,
        transform=ImageTransform(image_size=side * patch_size, resize_mode=mode),
        wrap_dataset=lambda base: base,
        collate_fn=collate_image_text,
        step_fn=contrastive_step,
        samples_per_batch=num_sequences,
        token_slots=slots,
    )


def input_policies(num_sequences: int, **options: Any) -> dict[str, InputPolicySetup]:
    """The three policies of NaViT's comparison, at the same token slots per batch."""
    return {name: input_policy(name, num_sequences, **options) for name in ("pack", "resize_square", "pad_square")}


__all__ = [
    "MAX_PATCHES",
    "MIN_PATCHES",
    "PATCH_SIZE",
    "InputPolicySetup",
    "NaViTDataset",
    "NativeTransform",
    "input_policies",
    "input_policy",
    "navit_step",
]
