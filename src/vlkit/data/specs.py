"""Typed data specifications: what a recipe (or one of its stages) trains on, each kind owning its own options.

A spec is a frozen config (``kind`` tag, JSON round trip) and says how its training records come to exist:

- ``ShapesScenes``: ShapesWorld scenes rendered once to a manifest under the run folder, plus ``colourless_copies``
  x ``train_size`` *extra* colourless copies (``shapes.colourless_copy``) of the first scenes;
- ``ShapesObjects``: one-object ShapesWorld scenes rendered on demand (classification), of which a
  ``colourless_fraction`` are *replaced* by their colourless copy;
- ``Digits``: scikit-learn's scanned digits with digit captions (``data.digits``);
- ``Manifest``: a user's JSONL / CSV manifest or WebDataset shards (``vlkit train --train-data``);
- ``ShapesText``: ShapesWorld text alone (captions, questions with their answers, ``<ref>``/``<box>`` strings), for
  pre-training a language model;
- ``ShapesInstructions``: ShapesWorld scenes rendered on demand as conversations of ``turns`` instruction items of
  the given ``kinds`` (``data.shapes_vqa``), for vision-language models.

A task says which kinds it can train on; the runner hands it the stage's spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from vlkit.config import ConfigBase, register_config
from vlkit.data import shapes
from vlkit.data.digits import DIGIT_TEMPLATES, DIGIT_WORDS, digits_split
from vlkit.data.images import BadSampleError
from vlkit.data.readers import ImageTextRecord, ReadResult, WebDatasetSource, read_records

__all__ = [
    "EXTRA_KINDS",
    "INSTRUCTION_KINDS",
    "DataSpec",
    "Digits",
    "Manifest",
    "ShapesInstructions",
    "ShapesObjects",
    "ShapesScenes",
    "ShapesText",
    "image_text_records",
]


def _check_eval_split(split: str) -> None:
    """A ShapesWorld spec's ``eval_split``: one of ``shapes.EVAL_SPLITS`` (the same metric keys on each)."""
    if split not in shapes.EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {shapes.EVAL_SPLITS}, got {split!r}")


@register_config
@dataclass(frozen=True)
class ShapesScenes(ConfigBase):
    """``train_size`` rendered ShapesWorld scenes (+ colourless copies); evaluation renders ``eval_size`` test
    scenes per set (``eval_split``: see ``shapes.EVAL_SPLITS``)."""

    kind: ClassVar[str] = "shapes"
    config: shapes.ShapesConfig = field(default_factory=shapes.ShapesConfig)
    train_size: int = 10_000
    eval_size: int = 400
    colourless_copies: float = 0.0
    eval_split: str = "test"

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):  # read back from recipe.json
            object.__setattr__(self, "config", shapes.ShapesConfig.from_dict(self.config))
        _check_eval_split(self.eval_split)
        if not 0.0 <= self.colourless_copies <= 1.0:
            raise ValueError(f"colourless_copies must be in [0, 1], got {self.colourless_copies}")
        if self.train_size < 1 or self.eval_size < 1:
            raise ValueError(f"train_size and eval_size must be >= 1, got {self.train_size}, {self.eval_size}")


@register_config
@dataclass(frozen=True)
class ShapesObjects(ConfigBase):
    """``train_size`` one-object scenes rendered on demand; ``colourless_fraction`` of them (a seeded draw per
    index) shown as their colourless copy instead. Evaluated on ``eval_size`` one-object scenes per set of
    ``eval_split`` (see ``shapes.EVAL_SPLITS``)."""

    kind: ClassVar[str] = "shapes_objects"
    config: shapes.ShapesConfig = field(default_factory=shapes.ShapesConfig)
    train_size: int = 10_000
    eval_size: int = 400
    colourless_fraction: float = 0.0
    eval_split: str = "test"

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", shapes.ShapesConfig.from_dict(self.config))
        _check_eval_split(self.eval_split)
        if not 0.0 <= self.colourless_fraction < 1.0:
            raise ValueError(f"colourless_fraction must be in [0, 1), got {self.colourless_fraction}")


@register_config
@dataclass(frozen=True)
class Digits(ConfigBase):
    """scikit-learn's scanned digits: four fifths train, every fifth image test (``data.digits.digits_split``)."""

    kind: ClassVar[str] = "digits"


@register_config
@dataclass(frozen=True)
class Manifest(ConfigBase):
    """A JSONL / CSV manifest or WebDataset shards (see ``data.readers.read_records``); ``skip_bad`` counts and
    skips bad items instead of stopping at the first."""

    kind: ClassVar[str] = "manifest"
    path: str = ""
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("a Manifest data spec needs a path")


@register_config
@dataclass(frozen=True)
class ShapesText(ConfigBase):
    """The ``text_samples`` of ``train_size`` training scenes (``plain``); with ``described``, also each scene's
    questions asked in the chat layout with a description of the scene standing where its image will
    (``described_conversations``, answers trained on): the language model learns to answer from a description in its
    context, which the bridge then learns to write. The description is the scene's caption, or with ``layout`` every
    object with its box, which answers spatial and grounding questions too. ``kinds`` (empty: all) and
    ``min_objects`` narrow the described questions to those kinds about scenes of at least that many objects: asked
    about two objects, a colour or shape question is answered only by binding the attribute to its noun. A stage on
    described text is evaluated on ``eval_size`` test scenes asked the same way (``DescribedTextEvaluation``;
    ``eval_split``: see ``shapes.EVAL_SPLITS``)."""

    kind: ClassVar[str] = "shapes_text"
    config: shapes.ShapesConfig = field(default_factory=shapes.ShapesConfig)
    train_size: int = 2000
    described: bool = False
    turns: int = 4  # question-answer turns per described conversation, as ShapesInstructions' turns
    layout: bool = False
    plain: bool = True
    kinds: tuple[str, ...] = ()
    min_objects: int = 1
    # The loss weight of a described conversation's other tokens (description, questions, template) against its
    # answers' 1: 0 trains on the answers alone, 1 on every token as a language model is pre-trained.
    context_weight: float = 0.0
    eval_size: int = 100  # test scenes a stage on described text is evaluated on (DescribedTextEvaluation)
    eval_split: str = "test"

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", shapes.ShapesConfig.from_dict(self.config))
        _check_eval_split(self.eval_split)
        # Described questions only: a layout in the context would answer the layout question by copying.
        object.__setattr__(self, "kinds", _instruction_kinds(self.kinds, extra=False))
        if self.eval_size < 1:
            raise ValueError(f"eval_size must be >= 1, got {self.eval_size}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if self.min_objects < 1:
            raise ValueError(f"min_objects must be >= 1, got {self.min_objects}")
        if not (self.plain or self.described):
            raise ValueError("ShapesText needs plain or described samples (or both)")
        if not 0 <= self.context_weight <= 1:
            raise ValueError(f"context_weight must be in [0, 1], got {self.context_weight}")
        if (self.kinds or self.min_objects > 1 or self.context_weight) and not self.described:
            raise ValueError("kinds, min_objects and context_weight concern described questions: they need "
                             "described=True")  # fmt: skip


INSTRUCTION_KINDS = ("caption", "colour", "shape", "count", "spatial", "existence", "size", "grounding")
# Kinds a mix holds only when it names them: the grounded description ("where are the objects?", answered with every
# object and its box; ``shapes_vqa.instruction_items(layout=True)``). In the demo's mix it raised grounding 0.708 ->
# 0.739 over five validation seeds with the stage 20 % slower, and not at all in the stage's old time; in
# honeybee_d_shapes as shipped 0.694 -> 0.748 over four, with seen VQA 0.922 -> 0.911 (docs/experiments.md, the
# forty-sixth and forty-seventh sessions). So no default mix holds it.
EXTRA_KINDS = ("layout",)


def _instruction_kinds(kinds: Sequence[str], extra: bool = True) -> tuple[str, ...]:
    """``kinds`` as a tuple (JSON and ``--set`` give lists), every one of them an instruction kind (or, with
    ``extra``, one of ``EXTRA_KINDS``)."""
    allowed = INSTRUCTION_KINDS + EXTRA_KINDS if extra else INSTRUCTION_KINDS
    unknown = sorted(set(kinds) - set(allowed))
    if unknown:
        raise ValueError(f"kinds must be a subset of {allowed}, got unknown {unknown}")
    return tuple(kinds)


def _weights(
    pairs: Sequence[Sequence[Any]], field: str, label: str, key: Callable[[Any], Any], problem: Callable[[Any], str]
) -> tuple[tuple[Any, float], ...]:
    """``pairs`` as ``((key, weight), ...)`` (JSON and ``--set`` give lists): each key read by ``key``, allowed
    (``problem`` says what is wrong with it, or ``""``) and named once, each weight positive. ``field`` and ``label``
    name the setting and its keys in the errors."""
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{field} holds ({label}, weight) pairs, got {list(pair)!r}")
        name, weight = key(pair[0]), float(pair[1])
        if wrong := problem(name):
            raise ValueError(f"{field}: {wrong}")
        if not weight > 0:
            raise ValueError(f"{field}: the weight of {name!r} must be positive, got {weight}")
        out.append((name, weight))
    named = [name for name, _ in out]
    if len(set(named)) != len(named):
        raise ValueError(f"{field} names the same {label} twice: {named}")
    return tuple(out)


def _kind_weights(pairs: Sequence[Sequence[Any]], kinds: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """``kind_weights``: each kind one of ``kinds``."""
    return _weights(
        pairs,
        "kind_weights",
        "kind",
        str,
        lambda kind: "" if kind in kinds else f"{kind!r} is not one of the drawn kinds {kinds}",
    )


def _object_weights(pairs: Sequence[Sequence[Any]], config: shapes.ShapesConfig) -> tuple[tuple[int, float], ...]:
    """``object_weights``: each object count one that ``config``'s scenes hold."""
    low, high = config.min_objects, config.max_objects
    return _weights(
        pairs, "object_weights", "object count", int,
        lambda objects: "" if low <= objects <= high else f"the scenes hold {low}-{high} objects, not {objects}",
    )  # fmt: skip


@register_config
@dataclass(frozen=True)
class ShapesInstructions(ConfigBase):
    """Conversations about ``train_size`` training scenes, ``turns`` question-answer turns each, drawn per epoch from
    the scene's instruction items of ``kinds`` (``INSTRUCTION_KINDS`` by default; ``EXTRA_KINDS`` when named);
    evaluation asks one question of each kind about ``eval_size`` test scenes of seen and of held-out colour x shape
    combinations (``eval_split``: see ``shapes.EVAL_SPLITS``).

    ``question_first``: the probability that a training conversation puts its first question before the image
    rather than after it (LLaVA-1.5's instruction data holds both orders); evaluation asks question-first when it
    is at least 0.5. Asked first, the question is in the context of every image token.

    ``kind_weights``: ``(kind, weight)`` pairs weighting the draw of a training conversation's kinds (a kind not named
    weighs 1); empty draws every kind alike, as the stream always has. Evaluation is unchanged.

    ``object_weights``: ``(objects, weight)`` pairs weighting the draw of a training scene by how many objects it
    holds (a count not named weighs 1): a scene is kept with probability its weight / the largest weight, else
    another is drawn, so ``((2, 3.0),)`` trains on two-object scenes, where an answer must be bound to the right
    object, three times as often against one-object ones as the generator makes them. Empty keeps every scene, as
    the stream always has. Evaluation is unchanged.

    ``fresh_answers``: no turn of a training conversation is answered by the text before it. A drawn item whose answer
    (apart from yes / no and numbers) is words that all stand in the conversation's earlier turns ("what shape is the
    purple object? circle" before "what colour is the circle? purple") is replaced by another item of its kind that
    is not, or by the next kind in the drawn order when every one is. Without it, most later colour, shape and
    spatial turns can be answered by copying a word from the text, which rewards copying an attribute without binding
    it to its object; evaluation asks each question alone, where only the image answers. False keeps the stream as it
    always was. No recipe uses it: on the demo's instruct stage it left colour as it was and lowered held-out VQA
    (five validation seeds: seen 0.906 against 0.902, held-out 0.748 against 0.782; docs/experiments.md, the
    forty-third session)."""

    kind: ClassVar[str] = "shapes_instructions"
    config: shapes.ShapesConfig = field(default_factory=shapes.ShapesConfig)
    train_size: int = 10_000
    eval_size: int = 100
    kinds: tuple[str, ...] = INSTRUCTION_KINDS
    turns: int = 4
    question_first: float = 0.0
    eval_split: str = "test"
    kind_weights: tuple[tuple[str, float], ...] = ()
    object_weights: tuple[tuple[int, float], ...] = ()
    fresh_answers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", shapes.ShapesConfig.from_dict(self.config))
        _check_eval_split(self.eval_split)
        object.__setattr__(self, "kinds", _instruction_kinds(self.kinds))
        if not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {INSTRUCTION_KINDS + EXTRA_KINDS}, got {self.kinds}")
        object.__setattr__(self, "kind_weights", _kind_weights(self.kind_weights, self.kinds))
        object.__setattr__(self, "object_weights", _object_weights(self.object_weights, self.config))
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if not 0.0 <= self.question_first <= 1.0:
            raise ValueError(f"question_first is a probability, got {self.question_first}")


DataSpec = ShapesScenes | ShapesObjects | Digits | Manifest | ShapesText | ShapesInstructions


def image_text_records(
    spec: DataSpec, data_dir: Path, progress: bool, skipped: list[BadSampleError] | None = None
) -> list[ImageTextRecord] | WebDatasetSource:
    """The image-text training records of ``spec`` (rendered into ``data_dir`` where it needs rendering); a manifest's
    lines skipped as bad (``skip_bad``) are added to ``skipped``, so that the run counts them."""
    if isinstance(spec, Manifest):
        result = read_records(spec.path, skip_bad=spec.skip_bad)
        if isinstance(result, WebDatasetSource):
            return result
        if not result.records:
            raise ValueError(f"{spec.path}: no usable records")
        if skipped is not None:
            skipped += result.skipped
        return result.records
    if isinstance(spec, Digits):
        return _digits_records(data_dir)
    if isinstance(spec, ShapesScenes):
        return _shapes_records(spec, data_dir, progress)
    raise ValueError(f"data kind {spec.kind!r} has no image-text records")


def _shapes_records(spec: ShapesScenes, data_dir: Path, progress: bool) -> list[ImageTextRecord]:
    """Render the training split (and its colourless copies) once; later runs with the same settings reuse it."""
    config_file = data_dir / "shapes_config.json"
    copies = round(spec.colourless_copies * spec.train_size)
    wanted = {**spec.config.to_dict(), "sizes": {"train": spec.train_size}, "colourless_copies": copies}
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as the file reads back
    if not (config_file.exists() and json.loads(config_file.read_text()) == wanted):
        shapes.write_shapes(data_dir, spec.config, {"train": spec.train_size}, progress=progress)
        _write_colourless_copies(spec.config, data_dir, copies, progress)
        config_file.write_text(json.dumps(wanted, indent=2, sort_keys=True))
    records = []
    for manifest in ("train.jsonl", "train_colourless.jsonl"):
        if (data_dir / manifest).exists():
            result = read_records(data_dir / manifest)
            assert isinstance(result, ReadResult)
            records += result.records
    return records


def _write_colourless_copies(config: shapes.ShapesConfig, data_dir: Path, count: int, progress: bool) -> None:
    """Colourless copies of train scenes 0..count-1 (images/train_colourless, train_colourless.jsonl)."""
    manifest = data_dir / "train_colourless.jsonl"
    manifest.unlink(missing_ok=True)
    if not count:
        return
    (data_dir / "images" / "train_colourless").mkdir(parents=True, exist_ok=True)
    low, high = shapes.GREY_LEVELS
    with manifest.open("w", encoding="utf-8") as handle:
        for index in tqdm(range(count), desc="colourless copies", disable=not progress, leave=False):
            grey = int(np.random.default_rng((config.seed, index, 1)).integers(low, high + 1))
            copy = shapes.colourless_copy(shapes.generate(config, "train", index), grey)
            relative = f"images/train_colourless/{index:06d}.png"
            copy.image.save(data_dir / relative)
            handle.write(json.dumps({"image": relative, **copy.to_record()}) + "\n")


def _digits_records(data_dir: Path) -> list[ImageTextRecord]:
    images, labels = digits_split("train")
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = data_dir / "images" / f"{index:05d}.png"
        if not path.exists():
            image.save(path)
        word = DIGIT_WORDS[int(label)]
        captions = [template.format(word) for template in DIGIT_TEMPLATES] + [f"a {word}.", f"the digit {label}."]
        records.append(ImageTextRecord(str(path), captions, f"digits:{index}"))
    return records
