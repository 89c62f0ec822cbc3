"""Grounding in Qwen-VL's format (Bai et al., 2023): ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``
with integer corners in [0, 1000), parsed from free model output and scored by IoU.

    parse_groundings(text) -> [Grounding(ref, box)]      every well-formed, in-range box, corners ordered
    box_iou(a, b) -> float in [0, 1]
    grounding_accuracy(predictions [str], targets [(x1, y1, x2, y2)], threshold=0.5) -> GroundingResult
    parse_layout(text) -> [(name, box)]                  a scene layout's objects ("a large red circle <box>...")
    layout_accuracy(predictions [str], targets [[(name, box)]], threshold=0.5) -> LayoutResult

A prediction is scored by its first valid box. A missing, malformed (non-integer, unclosed, wrong number of
corners), out-of-range or zero-area box is a miss; nothing in a model's output can make the scorer raise.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

BOX_SCALE = 1000
# At most 9 digits: a longer number is out of range anyway, and int() of a huge digit string is slow or refused.
_NUMBER = r"\s*(-?[0-9]{1,9})\s*"  # ASCII digits only: Qwen-VL's format writes no other
_BOX = re.compile(rf"<box>\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*</box>")
_REF_BEFORE = re.compile(r"<ref>((?:(?!<ref>).)*?)</ref>\s*$", re.DOTALL)


@dataclass(frozen=True)
class Grounding:
    ref: str | None  # the <ref> text right before the box, if any
    box: tuple[int, int, int, int]  # x1 < x2, y1 < y2, all in [0, BOX_SCALE)


@dataclass
class GroundingResult:
    accuracy: float  # fraction with IoU >= threshold
    mean_iou: float  # misses count as 0
    parsed: float  # fraction of predictions holding a valid box
    ious: list[float]
    threshold: float
    count: int

    def as_dict(self, prefix: str = "grounding_") -> dict[str, float]:
        return {
            f"{prefix}acc{round(100 * self.threshold)}": self.accuracy,
            f"{prefix}mean_iou": self.mean_iou,
            f"{prefix}parsed": self.parsed,
        }


def parse_groundings(text: object) -> list[Grounding]:
    """Every valid box in ``text``, in order, with the ``<ref>`` that precedes it; swapped corners are reordered."""
    if not isinstance(text, str):
        return []
    found = []
    for match in _BOX.finditer(text):
        x1, y1, x2, y2 = (int(value) for value in match.groups())
        box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        if not (0 <= box[0] < box[2] < BOX_SCALE and 0 <= box[1] < box[3] < BOX_SCALE):
            continue
        ref = _REF_BEFORE.search(text, 0, match.start())
        found.append(Grounding(ref.group(1).strip() if ref else None, box))
    return found


def parse_box(text: object) -> tuple[int, int, int, int] | None:
    """The first valid box in ``text``, or None."""
    groundings = parse_groundings(text)
    return groundings[0].box if groundings else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes with x1 <= x2, y1 <= y2 (continuous coordinates)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(0.0, width) * max(0.0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def grounding_accuracy(
    predictions: Sequence[str], targets: Sequence[Sequence[int]], threshold: float = 0.5
) -> GroundingResult:
    """Accuracy at IoU >= ``threshold`` (acc@0.5 by default) of each prediction's first valid box."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not targets:
        raise ValueError("no grounding targets to score")
    ious, parsed = [], 0
    for prediction, target in zip(predictions, targets, strict=True):
        x1, y1, x2, y2 = target
        if not (0 <= x1 < x2 < BOX_SCALE and 0 <= y1 < y2 < BOX_SCALE):
            raise ValueError(f"target box {list(target)} is not a box in [0, {BOX_SCALE})")
        box = parse_box(prediction)
        parsed += box is not None
        ious.append(box_iou(box, target) if box is not None else 0.0)
    hits = sum(iou >= threshold for iou in ious)
    return GroundingResult(hits / len(ious), sum(ious) / len(ious), parsed / len(ious), ious, threshold, len(ious))


@dataclass
class LayoutResult:
    accuracy: float  # fraction of the scenes' objects named with a box at IoU >= threshold
    named: float  # fraction of the objects named with a valid box, wherever it is
    threshold: float
    count: int  # objects scored

    def as_dict(self, prefix: str = "layout_") -> dict[str, float]:
        return {f"{prefix}acc{round(100 * self.threshold)}": self.accuracy, f"{prefix}named": self.named}


_LAYOUT_PART = re.compile(r"^(?:\s*and)?\s*(?:an?\s+)?(.*?)\s*$", re.DOTALL)


def parse_layout(text: object) -> list[tuple[str, tuple[int, int, int, int]]]:
    """``(name, box)`` for every valid box in a layout (``scene_layout``'s "a large red circle <box>...</box> and
    ..."), the name being the words between the previous box (or the start) and this one, without "and" or an
    article."""
    if not isinstance(text, str):
        return []
    parts, start = [], 0
    for match in _BOX.finditer(text):
        name = _LAYOUT_PART.match(text[start : match.start()]).group(1)  # type: ignore[union-attr]
        start = match.end()
        boxes = parse_groundings(match.group(0))
        if boxes:
            parts.append((" ".join(name.split()), boxes[0].box))
    return parts


def layout_accuracy(
    predictions: Sequence[str], targets: Sequence[Sequence[tuple[str, Sequence[int]]]], threshold: float = 0.5
) -> LayoutResult:
    """How many of each scene's objects (``targets``: ``(name, box)`` per object, the name as ``scene_layout``
    writes it without the article) a predicted layout names with a box at IoU >= ``threshold``; each predicted part
    is matched to one object at most (a scene's objects may share a name)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    total = sum(len(objects) for objects in targets)
    if not total:
        raise ValueError("no layout targets to score")
    hits = named = 0
    for prediction, objects in zip(predictions, targets, strict=True):
        parts = parse_layout(prediction)
        # Parts and objects are paired one to one, as many as can be, whatever order the layout lists them in: by
        # name for `named`, by name and box for the hits.
        predicted, true = Counter(part for part, _ in parts), Counter(name for name, _ in objects)
        named += sum(min(count, predicted[name]) for name, count in true.items())
        placed = [[k for k, (part, guess) in enumerate(parts) if part == name and box_iou(guess, box) >= threshold]
                  for name, box in objects]  # fmt: skip
        hits += _most_pairs(placed)
    return LayoutResult(hits / total, named / total, threshold, total)


def _most_pairs(options: list[list[int]]) -> int:
    """The largest number of items paired each with a distinct option of its own (``options[i]``: item i's), by
    augmenting paths (Kuhn's algorithm; a scene has a few objects)."""
    owner: dict[int, int] = {}

    def take(item: int, tried: set[int]) -> bool:
        for option in options[item]:
            if option not in tried:
                tried.add(option)
                if option not in owner or take(owner[option], tried):
                    owner[option] = item
                    return True
        return False

    return sum(take(item, set()) for item in range(len(options)))
