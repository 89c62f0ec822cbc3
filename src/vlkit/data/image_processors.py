"""transformers' image processors, as a model directory's ``preprocessor_config.json`` names them: one image -> the
float tensor (3, H, W) its checkpoint was trained on; SigLIP 2's NaFlex cuts it into patches.

- ``CLIPImageProcessor``: resize the shortest edge (bicubic), centre crop, rescale 1/255, normalise.
- ``SiglipImageProcessor``: resize to a fixed (H, W) (bicubic), rescale, normalise with 0.5 / 0.5.
- ``ViTImageProcessor``: resize to a fixed (H, W) (bilinear), rescale, normalise.
- ``BlipImageProcessor``: resize to a fixed (H, W) (bicubic), normalise with CLIP's mean and std.
- ``LlavaImageProcessor``: CLIP's, after LLaVA's pad-to-square with the mean colour (``do_pad``).
- ``ConvNextImageProcessor``: below 384 px resize the shortest edge to size / crop_pct and centre crop to size; from
  384 px up, warp to size x size.
- ``Siglip2ImageProcessor`` (NaFlex, Tschannen et al., 2025): resize (bilinear) to the largest size at the image's
  aspect ratio whose patch grid holds at most ``max_num_patches`` patches, rescale, normalise with 0.5 / 0.5, cut
  into patches flattened (row, col, channel) and pad: ``pixel_values`` (B, max_num_patches, p*p*3),
  ``pixel_attention_mask`` (B, max_num_patches) int32, ``spatial_shapes`` (B, 2) (rows, cols).

The numbers follow transformers 5's PIL backend (``*ImageProcessorPil``), which ``AutoImageProcessor`` returns when
torchvision is not installed: sizes from ``int(size * long / short)``, PIL resampling of the uint8 image, centre
crop offsets floored (``(H - h) // 2``, zero padding when the image is smaller), rescale in float64 then float32,
normalise in float32. With torchvision installed transformers 5 defaults to its torchvision backend instead, whose
tensor resize differs from PIL's by small amounts. (vlkit's own ``ImageTransform`` follows OpenAI's torchvision
pipeline, which rounds the crop offset instead of flooring it, so it is not reused here.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from vlkit.data.images import to_rgb
from vlkit.data.packing import patchify, size_for_max_patches
from vlkit.data.transforms import CLIP_MEAN, CLIP_STD


class NaFlexBatch(NamedTuple):
    """SigLIP 2 NaFlex images, each cut into patches and padded to ``max_num_patches`` rows."""

    pixel_values: torch.Tensor  # (B, L, p*p*3) float32
    pixel_attention_mask: torch.Tensor  # (B, L) int32, 1 = real patch
    spatial_shapes: torch.Tensor  # (B, 2) long: (rows, cols) of each image's patch grid


IMAGENET_STANDARD = (0.5, 0.5, 0.5)

# Per image-processor family: transformers' class defaults, and whether an int ``size`` means a square.
_FAMILIES: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
        "do_center_crop": True, "do_convert_rgb": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "square": False,
    },
    "LlavaImageProcessor": {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
        "do_center_crop": True, "do_convert_rgb": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "square": False, "do_pad": False,
    },
    "SiglipImageProcessor": {
        "size": {"height": 224, "width": 224}, "resample": 3, "do_convert_rgb": True,
        "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD, "square": False,
    },
    "BlipImageProcessor": {
        "size": {"height": 384, "width": 384}, "resample": 3, "do_convert_rgb": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "square": True,
    },
    "ViTImageProcessor": {
        "size": {"height": 224, "width": 224}, "resample": 2, "image_mean": IMAGENET_STANDARD,
        "image_std": IMAGENET_STANDARD, "square": True,
    },
    "ConvNextImageProcessor": {
        "size": {"shortest_edge": 384}, "resample": 3, "crop_pct": 224 / 256, "image_mean": IMAGENET_STANDARD,
        "image_std": IMAGENET_STANDARD, "square": False,
    },
    "Siglip2ImageProcessor": {
        "size": 224, "resample": 2, "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD, "square": False,
        "patch_size": 16, "max_num_patches": 256,
    },
}  # fmt: skip
_ALIASES = {
    "CLIPFeatureExtractor": "CLIPImageProcessor",
    "ViTFeatureExtractor": "ViTImageProcessor",
    "ConvNextFeatureExtractor": "ConvNextImageProcessor",
}


@dataclass(frozen=True)
class ImageProcessor:
    """One image -> (3, H, W) float tensor. ``size``: an int is the shortest edge, a pair is (height, width).

    ``crop_pct`` switches on ConvNeXt's resize (see the module docstring); ``max_num_patches`` (with
    ``patch_size``) SigLIP 2's NaFlex resize and patching, which ignores ``size``. ``family`` is the transformers
    class whose semantics and defaults apply, and is written back as ``image_processor_type``.
    """

    family: str = "CLIPImageProcessor"
    do_resize: bool = True
    size: int | tuple[int, int] = 224
    resample: int = 3
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None
    crop_pct: float | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    patch_size: int | None = None
    max_num_patches: int | None = None
    do_pad: bool = False

    def __post_init__(self) -> None:
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("do_center_crop needs a crop_size")
        if self.crop_pct is not None and not isinstance(self.size, int):
            raise ValueError(f"crop_pct needs a shortest-edge size, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need three values (std positive), got {self.mean} and {self.std}")
        if (self.patch_size is None) != (self.max_num_patches is None):
            raise ValueError("patch_size and max_num_patches go together (SigLIP 2 NaFlex)")
        if self.max_num_patches is not None and (self.max_num_patches < 1 or self.do_center_crop):
            raise ValueError(f"NaFlex needs max_num_patches >= 1 and no centre crop, got {self.max_num_patches}")
        if self.do_pad and self.family != "LlavaImageProcessor":
            raise ValueError(f"do_pad (LLaVA's pad-to-square) is LlavaImageProcessor's; {self.family} has none")

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], where: str = "preprocessor_config.json") -> ImageProcessor:
        name = str(data.get("image_processor_type") or data.get("feature_extractor_type") or "")
        for suffix in ("Fast", "Pil"):
            name = name.removesuffix(suffix)
        name = _ALIASES.get(name, name)
        if name not in _FAMILIES:
            raise ValueError(f"{where}: image processor {name or '(none named)'!r} is not supported; known: "
                             f"{sorted(_FAMILIES)}")  # fmt: skip
        defaults = _FAMILIES[name]
        merged = {**defaults, **{key: value for key, value in data.items() if value is not None}}
        crop_pct = merged.get("crop_pct") if name == "ConvNextImageProcessor" else None
        size = _size(merged["size"], defaults["square"], "size", where)
        if crop_pct is not None and not isinstance(size, int):
            raise ValueError(f"{where}: ConvNextImageProcessor needs size={{'shortest_edge': ...}}, got {size}")
        if name == "Siglip2ImageProcessor":
            return cls(
                family=name,
                do_resize=bool(merged.get("do_resize", True)),
                resample=int(merged["resample"]),
                do_rescale=bool(merged.get("do_rescale", True)),
                rescale_factor=float(merged.get("rescale_factor", 1 / 255)),
                do_normalize=bool(merged.get("do_normalize", True)),
                mean=_triple(merged["image_mean"]),
                std=_triple(merged["image_std"]),
                patch_size=int(merged["patch_size"]),
                max_num_patches=int(merged["max_num_patches"]),
            )
        crop = merged.get("crop_size")
        crop_size = _size(crop, True, "crop_size", where) if crop is not None else None
        return cls(
            family=name,
            do_resize=bool(merged.get("do_resize", True)),
            size=size,
            resample=int(merged["resample"]),
            do_center_crop=bool(merged.get("do_center_crop", False)),
            crop_size=crop_size if isinstance(crop_size, tuple) else None,
            crop_pct=float(crop_pct) if crop_pct is not None else None,
            do_rescale=bool(merged.get("do_rescale", True)),
            rescale_factor=float(merged.get("rescale_factor", 1 / 255)),
            do_normalize=bool(merged.get("do_normalize", True)),
            mean=_triple(merged["image_mean"]),
            std=_triple(merged["image_std"]),
            do_pad=_pads_to_square(name, merged, where),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        if self.max_num_patches is not None:
            return {
                "image_processor_type": self.family, "do_resize": self.do_resize, "resample": self.resample,
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
                "image_mean": list(self.mean), "image_std": list(self.std), "patch_size": self.patch_size,
                "max_num_patches": self.max_num_patches,
            }  # fmt: skip
        size = (
            {"shortest_edge": self.size}
            if isinstance(self.size, int)
            else dict(zip(("height", "width"), self.size, strict=True))
        )
        out: dict[str, Any] = {
            "image_processor_type": self.family, "do_resize": self.do_resize, "size": size,
            "resample": self.resample, "do_center_crop": self.do_center_crop, "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize, "image_mean": list(self.mean),
            "image_std": list(self.std), "do_convert_rgb": True,
        }  # fmt: skip
        if self.crop_size is not None:
            out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        if self.crop_pct is not None:
            out["crop_pct"] = self.crop_pct
        if self.do_pad:
            out["do_pad"] = True
        return out

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        image = to_rgb(as_pil(image))
        if self.do_pad:
            image = _pad_to_square(image, tuple(int(value * 255) for value in self.mean))
        if self.do_resize:
            image = self._resize(image)
        array = np.array(image, dtype=np.uint8)  # (H, W, 3)
        if self.do_center_crop:
            assert self.crop_size is not None
            array = _center_crop(array, self.crop_size)
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # (3, H, W) uint8
        # transformers rescales in float64 and rounds once to float32; dividing in float32 would differ by an ulp.
        values = (pixels.double() * self.rescale_factor).float() if self.do_rescale else pixels.float()
        if self.do_normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
            values = (values - mean) / std
        return values

    def batch(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        tensors = [self(image) for image in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"images processed to different sizes {sorted(shapes)}; they cannot form one batch")
        return torch.stack(tensors)  # (B, 3, H, W)

    def patches(self, images: Sequence[Image.Image | np.ndarray]) -> NaFlexBatch:
        """NaFlex: each image at its own size, cut into patches and padded to ``max_num_patches`` rows."""
        if self.patch_size is None or self.max_num_patches is None:
            raise ValueError(f"{self.family} does not cut images into patches (no max_num_patches)")
        length = self.max_num_patches
        pixel_values = torch.zeros(len(images), length, self.patch_size**2 * 3)
        mask = torch.zeros(len(images), length, dtype=torch.int32)
        shapes = torch.zeros(len(images), 2, dtype=torch.long)
        for row, image in enumerate(images):
            patched = patchify(self(image), self.patch_size)
            if patched.num_tokens > length:
                raise ValueError(f"image {row} gives {patched.num_tokens} patches, more than max_num_patches={length} "
                                 "(do_resize=False keeps its size)")  # fmt: skip
            pixel_values[row, : patched.num_tokens] = patched.patches
            mask[row, : patched.num_tokens] = 1
            shapes[row] = torch.tensor(patched.grid)
        return NaFlexBatch(pixel_values, mask, shapes)

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.patch_size is not None and self.max_num_patches is not None:
            new_height, new_width = size_for_max_patches(height, width, self.patch_size, self.max_num_patches)
            return image.resize((new_width, new_height), resample=self.resample)
        if self.crop_pct is not None:
            assert isinstance(self.size, int)
            if self.size >= 384:  # ConvNeXt evaluates at 384 px and above without cropping
                return image.resize((self.size, self.size), resample=self.resample)
            new_height, new_width = _shortest_edge(height, width, int(self.size / self.crop_pct))
            resized = image.resize((new_width, new_height), resample=self.resample)
            return Image.fromarray(_center_crop(np.asarray(resized), (self.size, self.size)))
        if isinstance(self.size, int):
            new_height, new_width = _shortest_edge(height, width, self.size)
        else:
            new_height, new_width = self.size
        return image.resize((new_width, new_height), resample=self.resample)


def _pads_to_square(family: str, settings: dict[str, Any], where: str) -> bool:
    """``do_pad`` as transformers reads it: LLaVA's pad-to-square (mean colour) for LlavaImageProcessor. Elsewhere
    it pads a batch to its largest image after normalising, which changes nothing where every image is processed to
    one size (vlkit batches no others), or to ``pad_size``, which vlkit does not do; ConvNeXt's ignores it."""
    if family == "LlavaImageProcessor":
        return bool(settings.get("do_pad", False))
    if settings.get("do_pad") and settings.get("pad_size") and family != "ConvNextImageProcessor":
        raise ValueError(f"{where}: do_pad with pad_size={settings['pad_size']!r} (zero padding to a fixed size) is "
                         f"not supported for {family}")  # fmt: skip
    return False


def _size(value: Any, square: bool, name: str, where: str) -> int | tuple[int, int]:
    """transformers' size conventions -> an int (shortest edge) or (height, width)."""
    if isinstance(value, int):
        return (value, value) if square else value
    if isinstance(value, list | tuple) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"])
        if set(value) == {"height", "width"}:
            return (int(value["height"]), int(value["width"]))
    raise ValueError(f"{where}: {name}={value!r} is not supported (use shortest_edge, or height and width)")


def _triple(value: Any) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected three channel values, got {value}")
    return (values[0], values[1], values[2])


def _pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred (offset floored) on a square of the longer side in ``color``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)  # type: ignore[arg-type]
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image, or a uint8 array (H, W[, C]) as one."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image or a uint8 array (H, W[, C]), got {type(image).__name__}")


def _shortest_edge(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size``; the longer side truncated after a float division, as in
    transformers' ``get_resize_output_image_size`` (exact integer arithmetic would differ in rare cases)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (h, w, C) around the centre, offsets floored; a smaller image is zero-padded to fit."""
    crop_height, crop_width = size
    height, width = array.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    canvas = np.zeros((new_height, new_width, *array.shape[2:]), dtype=array.dtype)
    pad_top, pad_left = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = array
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(new_height, top + crop_height), max(0, left) : min(new_width, left + crop_width)]
