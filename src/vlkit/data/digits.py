"""scikit-learn's 1,797 scanned 8x8 handwritten digits (shipped with the package: no download) and their captions.

A fixed split: every fifth image is test, the rest train. Recipes train on digit captions
(``DIGIT_TEMPLATES``), and the digits zero-shot evaluation classifies the test fifth into ``DIGIT_WORDS``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["DIGIT_TEMPLATES", "DIGIT_WORDS", "digits_images", "digits_split"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten digit {}.", "the number {}.", "a scan of the digit {}.")


def digits_images() -> tuple[list[Image.Image], np.ndarray]:
    """The digits as 8-bit grey images, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8), mode="L") for image in digits.images]
    return images, digits.target.astype(np.int64)


def digits_split(split: str) -> tuple[list[Image.Image], np.ndarray]:
    images, labels = digits_images()
    keep = [index for index in range(len(images)) if (index % 5 == 0) == (split == "test")]
    return [images[index] for index in keep], labels[keep]
