"""Safe image loading: any file or byte string -> one RGB ``PIL.Image.Image``, or a clear error.

Every reader in vlkit (manifests, CSV, WebDataset shards) decodes images through the one checked path
here, so a corrupt, truncated, odd-mode or gigantic image fails the same way everywhere: a
``BadSampleError`` whose message names the item ("shard-000.tar:sample42" or the image path) and says
what is wrong. Nothing here sets ``ImageFile.LOAD_TRUNCATED_IMAGES``: a half-decoded image silently
padded with grey is worse training data than a skipped one.

Mode handling (what ``to_rgb`` does):
  RGB                   unchanged
  1, L, CMYK, YCbCr     PIL's own conversion
  RGBA, LA, PA, RGBa, La, and P, L or RGB with a transparent colour (a PNG's tRNS chunk)
                        alpha-composited on white (transparent logos and line art are drawn for a white page;
                        on black they turn into dark blobs)
  I;16*, I              16-bit range 0..65535 scaled to 0..255 (PIL's convert clips instead, making most of a
                        16-bit image white)
  F                     [0, 1] scaled to 0..255 when every value lies in [0, 1]; otherwise read as 0..255
"""

from __future__ import annotations

import io
import os
import re
import stat
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# PIL's own default, so vlkit refuses exactly what PIL would warn about out of the box.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class BadSampleError(ValueError):
    """One training sample (an image, a manifest line, a caption) that cannot be used.

    ``str(error)`` is a single line ``"<item>: <reason>"`` so it can be logged or counted as is. Built from one
    message (as torch's DataLoader rebuilds an error raised in a worker), it recovers the item and reason from it.
    """

    def __init__(self, item: str, reason: str | None = None) -> None:
        if reason is None:
            # One argument: a message that torch's DataLoader rebuilt from an error raised in a worker process
            # ("Caught BadSampleError in DataLoader worker process 0.\nOriginal Traceback ...\n
            # vlkit.data.images.BadSampleError: <item>: <reason>"). Recover the original one-line error from it.
            item, reason = _split_message(item, type(self).__name__)
        super().__init__(f"{item}: {reason}" if item else reason)
        self.item = item
        self.reason = reason

    def __str__(self) -> str:
        # Built from the fields, not from ``args``: some libraries (webdataset) append context to ``args``.
        return f"{self.item}: {self.reason}" if self.item else self.reason

    def __reduce__(self) -> tuple[type[BadSampleError], tuple[str, str]]:
        # The default reduce passes only the formatted message back to __init__; the two fields keep ``item`` and
        # ``reason`` exact for errors pickled out of multiprocessing pools.
        return (type(self), (self.item, self.reason))


def _split_message(message: str, class_name: str) -> tuple[str, str]:
    """(item, reason) from a one-argument ``BadSampleError`` message; ``("", message)`` if it names no item.

    A worker's traceback ends with the line ``<module>.<class_name>: <item>: <reason>``, so the error's own text
    is what follows the last such line's class name. The item is what comes before that text's first ": ", so
    ``str()`` of the rebuilt error is the original's even when the item or the reason holds colons.
    """
    lines = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(class_name)}: ", message, flags=re.MULTILINE))
    text = (message[lines[-1].end() :] if lines else message).strip()
    item, separator, reason = text.partition(": ")
    return (item, reason) if separator else ("", text)


def load_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode, orient (EXIF) and convert the image at ``path`` to RGB.

    ``max_pixels`` refuses images with more pixels than that, from the header alone, before any pixel
    data is decoded (``None`` disables vlkit's check). PIL keeps its own global limit,
    ``PIL.Image.MAX_IMAGE_PIXELS``: to accept images beyond twice that, raise it as well.
    Raises ``BadSampleError`` naming the path for a missing, empty, truncated, non-image or oversized file.
    """
    item = str(path)
    try:
        file_status = os.stat(path)
    except FileNotFoundError:
        raise BadSampleError(item, "image file not found") from None
    except OSError as error:
        raise BadSampleError(item, f"cannot read image file ({error.strerror or error})") from None
    if stat.S_ISDIR(file_status.st_mode):
        raise BadSampleError(item, "image path is a directory, not a file")
    if file_status.st_size == 0:
        raise BadSampleError(item, "image file is empty (0 bytes)")
    try:
        with open(path, "rb") as stream:
            return _decode_checked(stream, item, max_pixels)
    except OSError as error:
        raise BadSampleError(item, f"cannot read image file ({error.strerror or error})") from None


def decode_image_bytes(data: bytes, item: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """``load_image`` for encoded bytes already in memory (a WebDataset member); ``item`` names it in errors."""
    if len(data) == 0:
        raise BadSampleError(item, "image data is empty (0 bytes)")
    return _decode_checked(io.BytesIO(data), item, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any PIL mode to RGB with the rules in the module docstring."""
    mode = image.mode
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A transparent palette index or colour key (PNG's tRNS): converting straight to RGB would drop it.
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(values, 0.0, 65535.0) * (255.0 / 65535.0)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are written either as [0, 1] intensities (most tools) or as 0..255 (PIL's own convention).
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def _decode_checked(stream: BinaryIO, item: str, max_pixels: int | None) -> Image.Image:
    """The one decode path shared by files and bytes: header check, full decode, EXIF orientation, RGB."""
    try:
        image = Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # The warning arrives as an exception only where warnings are escalated to errors (``-W error``).
        raise BadSampleError(item, f"image refused as a decompression bomb ({error})") from None
    except Image.UnidentifiedImageError:
        raise BadSampleError(item, "not a recognised image format") from None
    except Exception as error:
        raise BadSampleError(item, f"cannot open image ({type(error).__name__}: {error})") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadSampleError(item, f"image has an invalid size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise BadSampleError(
            item, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (max_pixels)"
        )

    try:
        # Image.open only reads the header; load() decodes every pixel, which is where truncation shows.
        image.load()
    except Exception as error:
        raise BadSampleError(item, f"image data is corrupt or truncated ({type(error).__name__}: {error})") from None

    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:
        # A malformed EXIF block says nothing about the pixels, which decoded fine; keep them as stored.
        oriented = image
    if oriented is None:
        oriented = image

    try:
        return to_rgb(oriented)
    except Exception as error:
        raise BadSampleError(
            item, f"cannot convert image mode {oriented.mode} to RGB ({type(error).__name__}: {error})"
        ) from None
