"""Captioning scored by attributes: which (colour, shape) objects a generated caption mentions, against the
scene's true objects, as precision / recall / F1 over the multisets (ShapesWorld's captioning metric).

    caption_mentions(text) -> Counter[(colour, shape)]     "two red circles and a blue square" -> 2x, 1x
    caption_scores(captions [str], objects [[ShapesObject | (colour, shape)]]) -> CaptionResult

A mention is a colour followed by a shape word, size words allowed around the colour ("a small red circle"), with
its multiplicity from a number ("two", "3", "a"/"an"/"one", "no" for none; a run of more than three digits is no
number); a plural without a number counts as two. Mentions
without a colour ("a circle", "two red shapes") name no object and are not counted. Scores are micro-averaged:
matched = sum over captions of the per-class minimum of predicted and true counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from vlkit.data.shapes import COLOURS, SHAPE_NAMES, ShapesObject, _plural
from vlkit.eval.vqa import NUMBER_WORDS

DEFAULT_COLOURS: tuple[str, ...] = (*COLOURS, "grey")
DEFAULT_SIZES: tuple[str, ...] = ("small", "large", "big", "tiny", "medium")
_WORD = re.compile(r"[a-z]+|[0-9]+")
# A count is a number word or at most three digits; "no red circles" mentions none. A longer digit run is no count.
_MAX_COUNT_DIGITS = 3
_NONE_WORDS = frozenset({"no", "none"})


@dataclass
class CaptionResult:
    precision: float
    recall: float
    f1: float
    exact: float  # fraction of captions whose mentions equal the true objects exactly
    count: int

    def as_dict(self, prefix: str = "caption_") -> dict[str, float]:
        return {
            f"{prefix}precision": self.precision,
            f"{prefix}recall": self.recall,
            f"{prefix}f1": self.f1,
            f"{prefix}exact": self.exact,
        }


def caption_mentions(
    text: str,
    colours: Sequence[str] = DEFAULT_COLOURS,
    shapes: Sequence[str] = SHAPE_NAMES,
    sizes: Sequence[str] = DEFAULT_SIZES,
) -> Counter[tuple[str, str]]:
    """The (colour, shape) objects ``text`` mentions, with multiplicity."""
    singular = {shape: shape for shape in shapes} | {_plural(shape): shape for shape in shapes}
    colour_set, size_set = set(colours), set(sizes)
    words = _WORD.findall(text.lower()) if isinstance(text, str) else []
    mentions: Counter[tuple[str, str]] = Counter()
    for position, word in enumerate(words):
        if word not in singular:
            continue
        before = position - 1
        while before >= 0 and words[before] in size_set:
            before -= 1
        if before < 0 or words[before] not in colour_set:
            continue
        colour = words[before]
        before -= 1
        while before >= 0 and words[before] in size_set:
            before -= 1
        number = NUMBER_WORDS.get(words[before], words[before]) if before >= 0 else ""
        plural = word != singular[word]
        if before >= 0 and words[before] in _NONE_WORDS:
            multiplicity = 0
        elif number.isdigit() and len(number) <= _MAX_COUNT_DIGITS:
            multiplicity = int(number)
        else:
            multiplicity = 2 if plural else 1
        if multiplicity:
            mentions[(colour, singular[word])] += multiplicity
    return mentions


def caption_scores(
    captions: Sequence[str],
    objects: Sequence[Sequence[ShapesObject | tuple[str, str]]],
    colours: Sequence[str] = DEFAULT_COLOURS,
    shapes: Sequence[str] = SHAPE_NAMES,
) -> CaptionResult:
    """Micro-averaged attribute precision / recall / F1 of generated captions against each scene's objects."""
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions but {len(objects)} scenes")
    if not captions:
        raise ValueError("no captions to score")
    matched = predicted = true = exact = 0
    for caption, scene in zip(captions, objects, strict=True):
        truth = Counter(
            (item.colour, item.shape) if isinstance(item, ShapesObject) else (item[0], item[1]) for item in scene
        )
        mentions = caption_mentions(caption, colours, shapes)
        matched += sum((mentions & truth).values())
        predicted += sum(mentions.values())
        true += sum(truth.values())
        exact += mentions == truth
    precision = matched / predicted if predicted else 0.0
    recall = matched / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return CaptionResult(precision, recall, f1, exact / len(captions), len(captions))
