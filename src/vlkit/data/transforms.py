"""Deterministic eval-style image preprocessing: RGB ``PIL.Image`` -> normalised float tensor (3, H, W).

The default reproduces CLIP's preprocessing (Radford et al., 2021): bicubic resize of the shorter side to
``image_size``, centre crop, scale to [0, 1], normalise with CLIP's channel mean and std. Two other resize
modes cover the common alternatives: ``"squash"`` (resize straight to H x W, ignoring the aspect ratio, as
SigLIP's big_vision pipeline does) and ``"pad"`` (fit the longer side, pad the rest, as LLaVA's
``expand2square`` does). There is no randomness: the same image always gives the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from vlkit.data.images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# shortest_crop resizes the whole image before cropping (as CLIP's preprocessing does) unless that image would hold
# more than this many times the target's pixels (an aspect ratio beyond 16:1).
_MAX_UPSCALED_AREA = 16

ResizeMode = Literal["shortest_crop", "squash", "pad"]


@dataclass(frozen=True)
class ImageTransform:
    """Callable ``image -> Tensor (3, H, W)``; ``image_size`` is a side length or ``(height, width)``.

    ``"pad"`` fills the border with the mean colour, so after normalisation the padding is zero (to 8-bit
    rounding) and carries no signal (LLaVA's choice for the same reason).
    """

    image_size: int | tuple[int, int] = 224
    resize_mode: ResizeMode = "shortest_crop"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        height, width = self.size
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize_mode not in ("shortest_crop", "squash", "pad"):
            raise ValueError(f"resize_mode must be 'shortest_crop', 'squash' or 'pad', got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {self.mean} and {self.std}")
        if any(value <= 0 for value in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        # Made once: two small tensors per call cost as much as normalising a 64-pixel image.
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1))

    @property
    def size(self) -> tuple[int, int]:
        """Output ``(height, width)``."""
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        height, width = self.image_size
        return (int(height), int(width))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.resize(image))

    def resize(self, image: Image.Image) -> np.ndarray:
        """The first half of the transform: ``image`` in RGB at ``size``, as (H, W, 3) uint8 pixels."""
        image = to_rgb(image)
        if self.resize_mode == "shortest_crop":
            image = self._resize_and_crop(image)
        elif self.resize_mode == "squash":
            height, width = self.size
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        else:
            image = self._resize_and_pad(image)
        return np.array(image, dtype=np.uint8)  # a copy of PIL's read-only buffer that torch can wrap

    def normalise(self, array: np.ndarray) -> torch.Tensor:
        """The second half: (H, W, 3) uint8 pixels at ``size`` (``resize``'s) -> the normalised (3, H, W) tensor."""
        # Torch wraps only writable arrays; the float copy leaves the array as it was.
        pixels = torch.from_numpy(array if array.flags.writeable else array.copy())
        pixels = pixels.permute(2, 0, 1).to(torch.float32) / 255.0
        return (pixels - self._mean) / self._std

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        target_height, target_width = self.size
        width, height = image.size
        # One scale for both axes so the aspect ratio survives, chosen so both sides cover the target (for a
        # square target: shorter side = image_size). The other side is floored in integer arithmetic, as
        # torchvision's Resize does, so outputs match CLIP's reference preprocessing pixel for pixel.
        if target_height * width >= target_width * height:
            new_height, new_width = target_height, target_height * width // height
        else:
            new_height, new_width = target_width * height // width, target_width
        left = round((new_width - target_width) / 2)
        top = round((new_height - target_height) / 2)
        if new_width * new_height > _MAX_UPSCALED_AREA * target_width * target_height:
            # An extreme aspect ratio (a 2000 x 1 strip would be upscaled to 448000 x 224): resample only the source
            # region the crop keeps, so a tiny file cannot take gigabytes.
            scale_x, scale_y = new_width / width, new_height / height
            box = (left / scale_x, top / scale_y, (left + target_width) / scale_x, (top + target_height) / scale_y)
            return image.resize((target_width, target_height), Image.Resampling.BICUBIC, box=box)
        if (new_width, new_height) != (width, height):
            # PIL's resize widens the filter support when shrinking, i.e. it is antialiased by construction.
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        if (new_width, new_height) == (target_width, target_height):
            return image
        return image.crop((left, top, left + target_width, top + target_height))

    def _resize_and_pad(self, image: Image.Image) -> Image.Image:
        target_height, target_width = self.size
        width, height = image.size
        scale = min(target_height / height, target_width / width)
        new_width = min(target_width, max(1, round(width * scale)))
        new_height = min(target_height, max(1, round(height * scale)))
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        fill = tuple(round(255 * value) for value in self.mean)
        canvas = Image.new("RGB", (target_width, target_height), fill)
        canvas.paste(image, ((target_width - new_width) // 2, (target_height - new_height) // 2))
        return canvas
