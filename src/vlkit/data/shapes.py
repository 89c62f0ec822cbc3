"""ShapesWorld: vlkit's embedded procedural image-text benchmark.

Renders small scenes of coloured shapes on a dark grey background and annotates each scene completely:
tight object boxes, several captions, question-answer pairs (colour, shape, size, count, relation,
existence, letter) and referring expressions. Every sample is a pure function of (seed, split, index), so a
dataset of any size is generated on the fly or written to disk byte-identically, with nothing to download.

Compositional generalisation is built in: a set of held-out (colour, shape) combinations never occurs in the
train/val/test splits and occurs in every `test_heldout` image, the zero-shot test of whether a model binds
attributes (CLIP, Radford et al., 2021, and its critics); `val_heldout` holds them the same way for validation, so
that settings are chosen without reading either test split (`eval_splits(config, "val")`). `aspect_ratios` samples
a width/height ratio per image at a roughly fixed pixel budget: the native-aspect-ratio input that NaViT (Dehghani
et al., 2023) packs.

    generate(config, split, index) -> ShapesSample(image (W, H) RGB, objects, captions, questions, referring)

Boxes are integer pixels [x1, y1, x2, y2] with exclusive x2/y2 (PIL's crop convention), tight around the
object's drawn pixels; centres are the box centres in continuous pixel coordinates.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

from vlkit.config import register_config

Split = Literal["train", "val", "test", "test_heldout", "val_heldout"]
# A split's index seeds its scenes, so a new split is appended and the existing ones keep their scenes.
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_heldout", "val_heldout")
HELDOUT_SPLITS: tuple[str, ...] = ("test_heldout", "val_heldout")  # every image shows a held-out combination
_SPLIT_IDS = {name: number for number, name in enumerate(SPLITS)}

# Saturated colours far apart in RGB and all far from the background, so a colour is never a judgement call.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 245),
    "yellow": (245, 225, 40),
    "purple": (165, 70, 230),
    "orange": (255, 145, 20),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (40, 40, 40)
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "pentagon", "cross")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
DEFAULT_COLOURS: tuple[str, ...] = tuple(COLOURS)
# I, O, Q, 0, 1 and 8 are left out: at 8 pixels they are indistinguishable from their look-alikes.
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ234579"

_PLACEMENT_TRIES = 64
# Objects never touch, so every pair is separated on some axis and the relation questions have an answer.
_GAP = 2
_MIN_OBJECT_PIXELS = 6


def diagonal_heldout(colours: Sequence[str], shapes: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """One held-out shape per colour, cycling through the shapes so each shape loses some colour when possible."""
    return tuple((colour, shapes[number % len(shapes)]) for number, colour in enumerate(colours))


DEFAULT_HELDOUT = diagonal_heldout(DEFAULT_COLOURS, DEFAULT_SHAPES)


@register_config
@dataclass(frozen=True)
class ShapesConfig:
    """Everything that decides a ShapesWorld dataset; two equal configs give byte-identical data.

    `sizes` maps a size name to the object's side as a fraction of min(width, height). In aspect-ratio mode
    the fraction applies to the configured width/height, so objects keep their pixel size across ratios.
    """

    kind: ClassVar[str] = "shapes_world"
    width: int = 64
    height: int = 64
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: tuple[str, ...] = DEFAULT_COLOURS
    sizes: tuple[tuple[str, float], ...] = (("small", 0.25), ("large", 0.4))
    letter_probability: float = 0.0
    heldout: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT
    aspect_ratios: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ValueError(f"width and height must be at least 16 pixels, got {self.width}x{self.height}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}")
        _check_names("shapes", self.shapes, SHAPE_NAMES)
        _check_names("colours", self.colours, tuple(COLOURS))
        size_names = [name for name, _ in self.sizes]
        if not size_names or len(set(size_names)) != len(size_names):
            raise ValueError(f"sizes must be non-empty with unique names, got {self.sizes}")
        for name, fraction in self.sizes:
            if not 0 < fraction <= 1:
                raise ValueError(f"size {name!r} must be a fraction in (0, 1] of the image side, got {fraction}")
            if round(fraction * min(self.width, self.height)) < _MIN_OBJECT_PIXELS:
                raise ValueError(f"size {name!r} gives objects under {_MIN_OBJECT_PIXELS} pixels; raise it")
        if not 0.0 <= self.letter_probability <= 1.0:
            raise ValueError(f"letter_probability must be in [0, 1], got {self.letter_probability}")
        if len(set(self.heldout)) != len(self.heldout):
            raise ValueError(f"heldout has repeated combinations: {self.heldout}")
        for colour, shape in self.heldout:
            if colour not in self.colours or shape not in self.shapes:
                raise ValueError(
                    f"held-out combination ({colour!r}, {shape!r}) is not in colours x shapes; "
                    "pass heldout=diagonal_heldout(colours, shapes) or heldout=() with custom colours/shapes"
                )
        if len(self.heldout) >= len(self.colours) * len(self.shapes):
            raise ValueError("heldout covers every (colour, shape) combination; train/val/test would be empty")
        if self.aspect_ratios is not None:
            low, high = self.aspect_ratios
            if not 0 < low <= high:
                raise ValueError(f"aspect_ratios must be (low, high) with 0 < low <= high, got {self.aspect_ratios}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShapesConfig":
        """Inverse of to_dict after a JSON round trip, which turns every tuple into a list."""
        values = dict(data)
        values.pop("kind", None)  # as a nested config (a data spec's) writes it
        for key in ("shapes", "colours"):
            if key in values:
                values[key] = tuple(values[key])
        for key in ("sizes", "heldout"):
            if key in values:
                values[key] = tuple(tuple(pair) for pair in values[key])
        if values.get("aspect_ratios") is not None:
            values["aspect_ratios"] = tuple(values["aspect_ratios"])
        return cls(**values)


def _check_names(field: str, names: tuple[str, ...], known: tuple[str, ...]) -> None:
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{field} must be non-empty and unique, got {names}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown {field} {unknown}; choose from {list(known)}")


@dataclass(frozen=True)
class ShapesObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    letter: str | None = None

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def to_record(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "box": list(self.box),
            "centre": list(self.centre),
            "letter": self.letter,
        }


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: Literal["colour", "shape", "count", "relation", "existence", "letter", "size"]


@dataclass(frozen=True)
class Referring:
    expression: str
    box: tuple[int, int, int, int]


@dataclass
class ShapesSample:
    image: Image.Image
    objects: list[ShapesObject]
    captions: list[str]
    questions: list[QA]
    referring: list[Referring]

    @property
    def caption(self) -> str:
        return self.captions[0]

    def to_record(self) -> dict[str, Any]:
        """The manifest line without its "image" path, which only the writer knows."""
        return {
            "caption": self.caption,
            "captions": list(self.captions),
            "objects": [item.to_record() for item in self.objects],
            "questions": [dataclasses.asdict(qa) for qa in self.questions],
            "referring": [{"expression": ref.expression, "box": list(ref.box)} for ref in self.referring],
            "width": self.image.width,
            "height": self.image.height,
        }


# ---------------------------------------------------------------------------------------------- combinations


def class_names(config: ShapesConfig) -> list[str]:
    """Every colour x shape class, colour-major: the label set for zero-shot classification."""
    return [f"{colour} {shape}" for colour in config.colours for shape in config.shapes]


def class_index(config: ShapesConfig, colour: str, shape: str) -> int:
    if colour not in config.colours or shape not in config.shapes:
        raise ValueError(f"({colour!r}, {shape!r}) is not a class of this config")
    return config.colours.index(colour) * len(config.shapes) + config.shapes.index(shape)


# Where a ShapesWorld evaluation reads: "test" (the numbers a run reports) or "val" (other scenes of the same seen and
# held-out combinations: the splits to compare settings on, so that the test splits only report the chosen one).
_EVAL_SPLIT_PAIRS: dict[str, tuple[Split, Split]] = {"test": ("test", "test_heldout"), "val": ("val", "val_heldout")}
EVAL_SPLITS: tuple[str, ...] = tuple(_EVAL_SPLIT_PAIRS)


def eval_splits(config: ShapesConfig, which: str = "test") -> tuple[Split, ...]:
    """The splits an evaluation reads: ``test`` (or ``val``), and ``test_heldout`` (``val_heldout``) when the config
    holds combinations out."""
    if which not in _EVAL_SPLIT_PAIRS:
        raise ValueError(f"the evaluation split must be 'test' or 'val', got {which!r}")
    pair = _EVAL_SPLIT_PAIRS[which]
    return pair if config.heldout else pair[:1]


def is_heldout(split: str) -> bool:
    """Whether every image of ``split`` shows a held-out combination (``test_heldout``, ``val_heldout``)."""
    return split in HELDOUT_SPLITS


def allowed_combos(config: ShapesConfig, split: Split) -> list[tuple[str, str]]:
    """The (colour, shape) classes a split draws from: the held-out ones for a held-out split, the rest otherwise."""
    _check_split(split)
    if is_heldout(split):
        return list(config.heldout)
    heldout = set(config.heldout)
    return [(colour, shape) for colour in config.colours for shape in config.shapes if (colour, shape) not in heldout]


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")


def _check_heldout(config: ShapesConfig, split: str) -> None:
    if is_heldout(split) and not config.heldout:
        raise ValueError(f"{split} needs a non-empty config.heldout")


def _check_sizes(config: ShapesConfig, sizes: Mapping[str, int]) -> None:
    """A writer's split -> count: known splits, counts >= 0, held-out splits only where combinations are held out."""
    for split, count in sizes.items():
        _check_split(split)
        if count < 0:
            raise ValueError(f"size of split {split!r} must be non-negative, got {count}")
        if count:
            _check_heldout(config, split)


# ---------------------------------------------------------------------------------------------- rendering


def _regular_polygon(pixels: int, sides: int, rotation: float) -> list[tuple[float, float]]:
    centre = radius = (pixels - 1) / 2
    angles = [math.radians(rotation + 360 * k / sides) for k in range(sides)]
    return [(centre + radius * math.cos(a), centre + radius * math.sin(a)) for a in angles]


def _star(pixels: int) -> list[tuple[float, float]]:
    centre = outer = (pixels - 1) / 2
    # A fat star (inner radius 0.45, not the pentagram's 0.38) stays star-like at 16 pixels.
    radii = [outer if k % 2 == 0 else 0.45 * outer for k in range(10)]
    angles = [math.radians(-90 + 36 * k) for k in range(10)]
    return [(centre + r * math.cos(a), centre + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


def _cross(pixels: int) -> list[tuple[float, float]]:
    end = pixels - 1
    centre, arm = end / 2, 0.18 * end
    low, high = centre - arm, centre + arm
    return [(low, 0), (high, 0), (high, low), (end, low), (end, high), (high, high),
            (high, end), (low, end), (low, high), (0, high), (0, low), (low, low)]  # fmt: skip


def _square(pixels: int) -> list[tuple[float, float]]:
    # Inset so a square's area roughly matches a circle's and size does not leak the shape.
    low, high = 0.06 * (pixels - 1), 0.94 * (pixels - 1)
    return [(low, low), (high, low), (high, high), (low, high)]


_OUTLINES: dict[str, Callable[[int], list[tuple[float, float]]]] = {
    "square": _square,
    "triangle": lambda pixels: [((pixels - 1) / 2, 0), (pixels - 1, pixels - 1), (0, pixels - 1)],
    "star": _star,
    "hexagon": lambda pixels: _regular_polygon(pixels, 6, 0),
    "diamond": lambda pixels: _regular_polygon(pixels, 4, -90),
    "pentagon": lambda pixels: _regular_polygon(pixels, 5, -90),
    "cross": _cross,
}
# Where a letter sits (fractions of the cell) and its font size (fraction of the side), chosen so it fits inside.
_LETTER_PLACEMENT: dict[str, tuple[float, float, float]] = {
    "circle": (0.5, 0.5, 0.55),
    "square": (0.5, 0.5, 0.6),
    "triangle": (0.5, 0.68, 0.38),
    "star": (0.5, 0.55, 0.32),
    "hexagon": (0.5, 0.5, 0.5),
    "diamond": (0.5, 0.5, 0.38),
    "pentagon": (0.5, 0.55, 0.45),
    "cross": (0.5, 0.5, 0.3),
}


@functools.lru_cache(maxsize=512)
def _shape_mask(shape: str, pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """The shape's binary mask cropped to its drawn pixels, and where the crop sat in the square cell.

    The box is read off the rasterised mask rather than the geometry, so it is tight by construction.
    """
    cell = Image.new("L", (pixels, pixels), 0)
    draw = ImageDraw.Draw(cell)
    if shape == "circle":
        draw.ellipse((0, 0, pixels - 1, pixels - 1), fill=255)
    else:
        draw.polygon(_OUTLINES[shape](pixels), fill=255)
    bbox = cell.getbbox()
    assert bbox is not None, f"{shape} drew nothing at {pixels} pixels"
    return cell.crop(bbox), (bbox[0], bbox[1])


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    return ImageFont.load_default()


def _letter_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    # Pure black/white are not palette colours, so letter pixels are never mistaken for another object.
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 128 else (255, 255, 255)


def _draw_object(image: Image.Image, item: ShapesObject, pixels: int) -> None:
    mask, offset = _shape_mask(item.shape, pixels)
    rgb = COLOURS[item.colour]
    if item.letter is None:
        image.paste(rgb, item.box, mask)
        return
    # The letter is drawn on a tile that is pasted through the shape mask, so it can never leave the shape.
    tile = Image.new("RGB", mask.size, rgb)
    draw = ImageDraw.Draw(tile)
    anchor_x, anchor_y, scale = _LETTER_PLACEMENT[item.shape]
    font = _font(max(6, round(scale * pixels)))
    left, top, right, bottom = draw.textbbox((0, 0), item.letter, font=font)
    x = anchor_x * (pixels - 1) - offset[0] - (left + right) / 2
    y = anchor_y * (pixels - 1) - offset[1] - (top + bottom) / 2
    draw.text((x, y), item.letter, fill=_letter_colour(rgb), font=font)
    image.paste(tile, item.box[:2], mask)


def _image_size(config: ShapesConfig, rng: np.random.Generator) -> tuple[int, int]:
    if config.aspect_ratios is None:
        return config.width, config.height
    low, high = config.aspect_ratios
    # Log-uniform, so 1:2 and 2:1 are equally likely.
    ratio = math.exp(rng.uniform(math.log(low), math.log(high)))
    area = config.width * config.height
    width = max(16, 8 * round(math.sqrt(area * ratio) / 8))
    height = max(16, 8 * round(math.sqrt(area / ratio) / 8))
    return width, height


def _too_close(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] + _GAP and b[0] < a[2] + _GAP and a[1] < b[3] + _GAP and b[1] < a[3] + _GAP


def _render(
    config: ShapesConfig, rng: np.random.Generator, combos: list[tuple[str, str]]
) -> tuple[Image.Image, list[ShapesObject]]:
    """Place and draw one object per (colour, shape); one that finds no free spot is dropped."""
    width, height = _image_size(config, rng)
    image = Image.new("RGB", (width, height), BACKGROUND)
    reference = min(config.width, config.height)
    placed: list[ShapesObject] = []
    for colour, shape in combos:
        size, fraction = config.sizes[int(rng.integers(len(config.sizes)))]
        pixels = max(_MIN_OBJECT_PIXELS, min(round(fraction * reference), width, height))
        has_letter = rng.random() < config.letter_probability
        letter = LETTERS[int(rng.integers(len(LETTERS)))] if has_letter else None
        mask_width, mask_height = _shape_mask(shape, pixels)[0].size
        for _ in range(_PLACEMENT_TRIES):
            x1 = int(rng.integers(0, width - mask_width + 1))
            y1 = int(rng.integers(0, height - mask_height + 1))
            box = (x1, y1, x1 + mask_width, y1 + mask_height)
            if not any(_too_close(box, other.box) for other in placed):
                item = ShapesObject(shape=shape, colour=colour, size=size, box=box, letter=letter)
                _draw_object(image, item, pixels)
                placed.append(item)
                break
    return image, placed


# ---------------------------------------------------------------------------------------------- language

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Strict separation of the boxes: a relation is only stated when no reader could dispute it.
_RELATIONS: dict[str, Callable[[ShapesObject, ShapesObject], bool]] = {
    "left of": lambda a, b: a.box[2] <= b.box[0],
    "right of": lambda a, b: b.box[2] <= a.box[0],
    "above": lambda a, b: a.box[3] <= b.box[1],
    "below": lambda a, b: b.box[3] <= a.box[1],
}
_CENTRE_SIDE: dict[str, Callable[[ShapesObject, ShapesObject], bool]] = {
    "left of": lambda a, b: a.centre[0] < b.centre[0],
    "right of": lambda a, b: a.centre[0] > b.centre[0],
    "above": lambda a, b: a.centre[1] < b.centre[1],
    "below": lambda a, b: a.centre[1] > b.centre[1],
}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_EXTREME = {"left of": "leftmost", "right of": "rightmost", "above": "topmost", "below": "bottommost"}
# Names used inside relation and letter questions: always say the colour and shape, add size if needed.
_NAME_OPTIONS = (("colour", "shape"), ("size", "colour", "shape"))


def _number(count: int) -> str:
    return _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)


def _plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _phrase(item: ShapesObject, attributes: Sequence[str], noun: str = "shape") -> str:
    words = [getattr(item, name) for name in ("size", "colour") if name in attributes]
    words.append(item.shape if "shape" in attributes else noun)
    return " ".join(words)


def _unique_phrase(
    item: ShapesObject, objects: Sequence[ShapesObject], options: Sequence[Sequence[str]], noun: str = "shape"
) -> str | None:
    """The first attribute set in `options` that singles out `item`, as a phrase; None if none does."""
    for attributes in options:
        matches = sum(all(getattr(o, a) == getattr(item, a) for a in attributes) for o in objects)
        if matches == 1:
            return _phrase(item, attributes, noun)
    return None


def _full_description(item: ShapesObject) -> str:
    letter = f" with the letter {item.letter}" if item.letter else ""
    return _article(f"{item.size} {item.colour} {item.shape}{letter}")


def _captions(objects: list[ShapesObject], width: int, height: int) -> list[str]:
    ordered = sorted(objects, key=lambda o: o.centre)
    full = _join([_full_description(o) for o in ordered])
    short = [_article(f"{o.colour} {o.shape}") for o in ordered]
    count = len(ordered)
    noun = "shape" if count == 1 else "shapes"
    captions = [
        full,
        f"a photo of {full}",
        f"there {'is' if count == 1 else 'are'} {_number(count)} {noun}: {_join(short)}",
        _join(short),
    ]
    if count == 1:
        column = ("left", "middle", "right")[min(2, int(3 * ordered[0].centre[0] / width))]
        row = ("top", "middle", "bottom")[min(2, int(3 * ordered[0].centre[1] / height))]
        place = " ".join(part for part in (row, column) if part != "middle") or "centre"
        captions.append(f"{short[0]} in the {place} of the image")
    elif count == 2 and _RELATIONS["left of"](ordered[0], ordered[1]):
        captions.append(f"{short[0]} to the left of {short[1]}")
    elif count == 2:
        top, bottom = sorted(range(2), key=lambda k: ordered[k].centre[1])
        captions.append(f"{short[top]} above {short[bottom]}")
    else:
        captions.append(f"from left to right: {_join(short)}")
    colour_counts = Counter(o.colour for o in ordered)
    captions.append(_join([f"{_number(n)} {c} {'shape' if n == 1 else 'shapes'}" for c, n in colour_counts.items()]))
    return captions


def _questions(config: ShapesConfig, split: Split, objects: list[ShapesObject], rng: np.random.Generator) -> list[QA]:
    questions = [QA("how many shapes are there?", str(len(objects)), "count")]
    colour_counts = Counter(o.colour for o in objects)
    shape_counts = Counter(o.shape for o in objects)
    absent_colours = [c for c in config.colours if c not in colour_counts]
    absent_shapes = [s for s in config.shapes if s not in shape_counts]
    # One absent colour and shape each, so "0" is a possible count answer.
    asked_colours = [c for c in config.colours if c in colour_counts]
    asked_shapes = [s for s in config.shapes if s in shape_counts]
    if absent_colours:
        asked_colours.append(absent_colours[int(rng.integers(len(absent_colours)))])
    if absent_shapes:
        asked_shapes.append(absent_shapes[int(rng.integers(len(absent_shapes)))])
    questions += [QA(f"how many {c} shapes are there?", str(colour_counts[c]), "count") for c in asked_colours]
    questions += [QA(f"how many {_plural(s)} are there?", str(shape_counts[s]), "count") for s in asked_shapes]

    for item in objects:
        if reference := _unique_phrase(item, objects, [("shape",), ("size", "shape")]):
            questions.append(QA(f"what colour is the {reference}?", item.colour, "colour"))
        if reference := _unique_phrase(item, objects, [("colour",), ("size", "colour")], noun="object"):
            questions.append(QA(f"what shape is the {reference}?", item.shape, "shape"))
        if reference := _unique_phrase(item, objects, [("shape",), ("colour", "shape")]):
            questions.append(QA(f"what size is the {reference}?", item.size, "size"))
        name = _unique_phrase(item, objects, _NAME_OPTIONS)
        if item.letter and name:
            questions.append(QA(f"what letter is on the {name}?", item.letter, "letter"))

    names = {id(o): _unique_phrase(o, objects, _NAME_OPTIONS) for o in objects}
    for a, asked, b, answer in _pairwise_relations(objects, names, rng):
        questions.append(QA(f"is the {names[id(a)]} {asked} the {names[id(b)]}?", answer, "relation"))
    for anchor, relation, target in _unique_neighbours(objects, names):
        answer = f"{target.colour} {target.shape}"
        questions.append(QA(f"what is {relation} the {names[id(anchor)]}?", answer, "relation"))

    present = sorted({(o.colour, o.shape) for o in objects}, key=lambda combo: class_index(config, *combo))
    # "No" answers come from the split's own combinations, so train never mentions a held-out combination.
    pool = allowed_combos(config, "train") + (list(config.heldout) if is_heldout(split) else [])
    absent = [combo for combo in pool if combo not in present]
    asked = min(2, len(present), len(absent))
    for combo in [present[k] for k in rng.permutation(len(present))[:asked]]:
        questions.append(QA(f"is there {_article(' '.join(combo))}?", "yes", "existence"))
    for combo in [absent[k] for k in rng.permutation(len(absent))[:asked]]:
        questions.append(QA(f"is there {_article(' '.join(combo))}?", "no", "existence"))
    return questions


def _pairwise_relations(
    objects: list[ShapesObject], names: Mapping[int, str | None], rng: np.random.Generator
) -> list[tuple[ShapesObject, str, ShapesObject, str]]:
    """(a, relation, b, "yes" / "no") for each pair of nameable objects, in a random order, and each axis on which
    their boxes are separated; the relation asked is the true one or its opposite at random, so that the yes / no
    answers are balanced."""
    found = []
    for first in range(len(objects)):
        for second in range(first + 1, len(objects)):
            a, b = objects[first], objects[second]
            if rng.random() < 0.5:
                a, b = b, a
            if not (names[id(a)] and names[id(b)]):
                continue
            for relation in ("left of", "above"):
                if not (_RELATIONS[relation](a, b) or _RELATIONS[_OPPOSITE[relation]](a, b)):
                    continue  # the boxes overlap on this axis: neither relation is beyond dispute
                asked = relation if rng.random() < 0.5 else _OPPOSITE[relation]
                found.append((a, asked, b, "yes" if _RELATIONS[asked](a, b) else "no"))
    return found


def _unique_neighbours(
    objects: list[ShapesObject], names: Mapping[int, str | None]
) -> list[tuple[ShapesObject, str, ShapesObject]]:
    """(anchor, relation, target) where target is the only object on that side of a nameable anchor, even by its
    centre, and clearly (their boxes separated)."""
    found = []
    for anchor in objects:
        if not names[id(anchor)]:
            continue
        others = [o for o in objects if o is not anchor]
        for relation, holds in _RELATIONS.items():
            by_centre = [o for o in others if _CENTRE_SIDE[relation](o, anchor)]
            if len(by_centre) == 1 and holds(by_centre[0], anchor):
                found.append((anchor, relation, by_centre[0]))
    return found


def _referring(objects: list[ShapesObject]) -> list[Referring]:
    expressions: dict[str, tuple[int, int, int, int]] = {}
    for item in objects:
        full = _unique_phrase(item, objects, [("size", "colour", "shape")])
        short = _unique_phrase(item, objects, [("shape",), ("colour",), ("colour", "shape")])
        for phrase in (full, short):
            if phrase:
                expressions.setdefault(f"the {phrase}", item.box)
        letters = [o.letter for o in objects]
        if item.letter and letters.count(item.letter) == 1:
            expressions[f"the shape with the letter {item.letter}"] = item.box
    names = {id(o): _unique_phrase(o, objects, _NAME_OPTIONS) for o in objects}
    for anchor, relation, target in _unique_neighbours(objects, names):
        expressions[f"the shape {relation} the {names[id(anchor)]}"] = target.box
    if len(objects) > 1:
        for relation, word in _EXTREME.items():
            for item in objects:
                if all(_RELATIONS[relation](item, other) for other in objects if other is not item):
                    expressions[f"the {word} shape"] = item.box
    return [Referring(expression, box) for expression, box in expressions.items()]


def _annotate(
    config: ShapesConfig, split: Split, image: Image.Image, objects: list[ShapesObject], rng: np.random.Generator
) -> ShapesSample:
    return ShapesSample(
        image=image,
        objects=objects,
        captions=_captions(objects, image.width, image.height),
        questions=_questions(config, split, objects, rng),
        referring=_referring(objects),
    )


# ---------------------------------------------------------------------------------------------- public entry points


def _rng(config: ShapesConfig, split: Split, index: int, stream: int) -> np.random.Generator:
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    entropy = [config.seed, _SPLIT_IDS[split], index] + ([stream] if stream else [])
    return np.random.default_rng(entropy)


def generate(config: ShapesConfig, split: Split, index: int) -> ShapesSample:
    """Scene `index` of `split`: min_objects..max_objects shapes, fully annotated, deterministic."""
    rng = _rng(config, split, index, stream=0)
    _check_heldout(config, split)
    seen = allowed_combos(config, "train")
    anything = seen + list(config.heldout)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    combos = []
    for number in range(count):
        # The first object is placed into an empty image, so a held-out object there always survives placement.
        pool = seen
        if is_heldout(split):
            pool = list(config.heldout) if number == 0 else anything
        combos.append(pool[int(rng.integers(len(pool)))])
    image, objects = _render(config, rng, combos)
    return _annotate(config, split, image, objects, rng)


def single_object(config: ShapesConfig, split: Split, index: int) -> ShapesSample:
    """A one-object image whose (colour, shape) class is uniform over the split's allowed combinations."""
    rng = _rng(config, split, index, stream=1)
    combos = allowed_combos(config, split)
    if not combos:
        raise ValueError(f"split {split!r} has no (colour, shape) combinations; heldout is empty")
    image, objects = _render(config, rng, [combos[int(rng.integers(len(combos)))]])
    return _annotate(config, split, image, objects, rng)


# A colourless copy's grey: brighter than the background, darker than white and than every palette colour's brightest
# channel, so it is never a palette colour.
GREY_LEVELS = (90, 200)


def colourless_copy(sample: ShapesSample, grey: int) -> ShapesSample:
    """The scene with every object repainted ``grey`` (R = G = B) and called "grey" in its captions and referring
    expressions: shape, size and layout without colour. Questions are left out (their answers name colours).

    Recipes add such copies to a training set (``Recipe.colourless_copies``): a grey circle and a grey hexagon in one
    batch differ only in shape, the contrast that teaches a tower shape apart from colour. No palette colour is
    involved, so a held-out colour x shape combination still never occurs in training.
    """
    if not GREY_LEVELS[0] <= grey <= GREY_LEVELS[1]:
        raise ValueError(f"grey must be in {GREY_LEVELS}, got {grey}")
    pixels = np.array(sample.image)
    for colour in {item.colour for item in sample.objects}:
        pixels[(pixels == COLOURS[colour]).all(axis=-1)] = grey
    objects = [dataclasses.replace(item, colour="grey") for item in sample.objects]
    image = Image.fromarray(pixels)
    return ShapesSample(image, objects, _captions(objects, image.width, image.height), [], _referring(objects))


class ShapesDataset(torch.utils.data.Dataset):
    """`size` ShapesWorld samples of one split, generated on the fly (no disk, no state, worker-safe)."""

    def __init__(self, config: ShapesConfig, split: Split, size: int, single_object: bool = False) -> None:
        _check_split(split)
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        _check_heldout(config, split)
        self.config = config
        self.split = split
        self.size = size
        self.single_object = single_object

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> ShapesSample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a ShapesDataset of size {self.size}")
        make = single_object if self.single_object else generate
        return make(self.config, self.split, index)


def write_shapes(
    out_dir: str | Path, config: ShapesConfig, sizes: Mapping[str, int], progress: bool = True
) -> dict[str, Path]:
    """Write images/{split}/{index:06d}.png, one {split}.jsonl manifest per split and shapes_config.json.

    Returns split -> manifest path. The same config and sizes give byte-identical files.
    """
    _check_sizes(config, sizes)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}
    for split, count in sizes.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        manifest = root / f"{split}.jsonl"
        # Written under a temporary name so an interrupted run never leaves a manifest that looks complete.
        partial = manifest.with_name(manifest.name + ".tmp")
        with partial.open("w", encoding="utf-8") as handle:
            for index in tqdm(range(count), desc=f"shapes {split}", unit="img", disable=not progress):
                sample = generate(config, split, index)  # type: ignore[arg-type]
                relative = f"images/{split}/{index:06d}.png"
                sample.image.save(root / relative, format="PNG")
                handle.write(json.dumps({"image": relative, **sample.to_record()}) + "\n")
        os.replace(partial, manifest)
        manifests[split] = manifest
    settings = {"config": config.to_dict(), "sizes": dict(sizes)}
    (root / "shapes_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return manifests


def shapes_main(argv: list[str] | None = None) -> int:
    """`vlkit data shapes --out DIR ...`: write a ShapesWorld dataset to disk; returns the exit status."""
    parser = argparse.ArgumentParser(prog="vlkit data shapes", description="Write the ShapesWorld benchmark.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    splits = (("--train", 10000), ("--val", 1000), ("--test", 1000), ("--test-heldout", 1000), ("--val-heldout", 0))
    for flag, default in splits:
        parser.add_argument(flag, type=int, default=default, help=f"samples in that split (default {default})")
    for flag, default in (("--width", 64), ("--height", 64), ("--min-objects", 1), ("--max-objects", 3), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--letter-probability", type=float, default=0.0)
    parser.add_argument("--aspect-ratio-min", type=float, default=None, help="with --aspect-ratio-max")
    parser.add_argument("--aspect-ratio-max", type=float, default=None, help="with --aspect-ratio-min")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--format",
        choices=("jsonl", "llava"),
        default="jsonl",
        help="jsonl: vlkit manifests (default); llava: LLaVA conversation JSON with the instruction mix",
    )
    args = parser.parse_args(argv)

    if (args.aspect_ratio_min is None) != (args.aspect_ratio_max is None):
        print("error: give both --aspect-ratio-min and --aspect-ratio-max, or neither", file=sys.stderr)
        return 2
    aspect_ratios = None if args.aspect_ratio_min is None else (args.aspect_ratio_min, args.aspect_ratio_max)
    try:
        config = ShapesConfig(
            width=args.width,
            height=args.height,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            letter_probability=args.letter_probability,
            aspect_ratios=aspect_ratios,
            seed=args.seed,
        )
        counts = {"train": args.train, "val": args.val, "test": args.test, "test_heldout": args.test_heldout,
                  "val_heldout": args.val_heldout}  # fmt: skip
        write = write_shapes
        if args.format == "llava":
            from vlkit.data.shapes_vqa import write_llava as write
        manifests = write(args.out, config, {s: n for s, n in counts.items() if n}, progress=not args.quiet)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for split, manifest in manifests.items():
        print(f"{split}: {counts[split]} samples -> {manifest}")
    return 0
