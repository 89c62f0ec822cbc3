"""ShapesWorld instruction data: captions, questions of every kind a scene supports, and referring expressions
answered with a box, for training and evaluating vision-language models (LLaVA, Liu et al., 2023; Qwen-VL's
grounding format, Bai et al., 2023).

    instruction_items(sample, config, split, layout=False) -> [InstructionItem(kind, question, answer, box)]
    text_samples(sample, config, split) -> [str]    the same answers as text, to pre-train a language model on
    described_conversations(sample, config, split) -> [Conversation]   the questions with the caption in context
    scene_layout(sample) -> str                     the scene as text with each object's box
    write_llava(out_dir, config, sizes) -> {split: llava_<split>.json}   LLaVA's conversation JSON + images

Kinds: caption, colour, shape, count, spatial (left / right / above / below), existence (yes and no in equal
number), size, grounding; and, when asked for, layout (every object with its box: ``scene_layout``). Answers are
short: one word or a digit ("red", "3", "yes"); a caption is ShapesWorld's full description; a grounding answer is
``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>`` with corners normalised to integers in [0, 1000)
(``normalise_box``). A question is only asked when its phrase singles out one object, so two identical objects never
make an ambiguous question, and a spatial relation only when the two boxes are separated on that axis. Every random
choice is seeded by the scene itself: the same scene gives the same items.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlkit.data.shapes import (
    ShapesConfig,
    ShapesObject,
    ShapesSample,
    Split,
    _article,
    _check_sizes,
    _check_split,
    _pairwise_relations,
    _plural,
    _unique_neighbours,
    _unique_phrase,
    allowed_combos,
    class_index,
    generate,
    is_heldout,
)
from vlkit.seeding import mix_seed
from vlkit.text.chat import IMAGE_PLACEHOLDER, Conversation, Turn

Kind = Literal["caption", "colour", "shape", "count", "spatial", "existence", "size", "grounding", "layout"]
KINDS: tuple[str, ...] = ("caption", "colour", "shape", "count", "spatial", "existence", "size", "grounding")
CAPTION_PROMPT = "describe the image."
# The grounded description's question: every object with its box (``scene_layout``), in the words grounding asks in.
LAYOUT_QUESTION = "where are the objects?"
# Qwen-VL's grounding coordinates: integers in [0, 1000) whatever the image size.
BOX_SCALE = 1000
_WORD = re.compile(r"[a-z]+")
_VQA_STREAM = 5  # keeps this module's draws apart from any other stream seeded by the same scene
# Phrases that name one object in relation and grounding questions: colour and shape, plus size when needed.
_OBJECT_NAMES = (("colour", "shape"), ("size", "colour", "shape"))


@dataclass(frozen=True)
class InstructionItem:
    kind: Kind
    question: str
    answer: str
    box: tuple[int, int, int, int] | None = None  # grounding target in [0, BOX_SCALE) coordinates


def normalise_box(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box [x1, y1, x2, y2] (exclusive x2/y2) -> integer corners in [0, 1000), floored as Qwen-VL does; the
    image's far edge (x2 == width) lands on 999, the largest value the format allows."""
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"box {list(box)} is not inside a {width}x{height} image")
    top = BOX_SCALE - 1
    return (
        min(top, x1 * BOX_SCALE // width),
        min(top, y1 * BOX_SCALE // height),
        min(top, x2 * BOX_SCALE // width),
        min(top, y2 * BOX_SCALE // height),
    )


def format_box(box: Sequence[int]) -> str:
    x1, y1, x2, y2 = box
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def format_grounding(ref: str, box: Sequence[int]) -> str:
    """``<ref>ref</ref><box>(x1,y1),(x2,y2)</box>``: Qwen-VL's answer to a referring expression."""
    return f"<ref>{ref}</ref>{format_box(box)}"


def scene_rng(sample: ShapesSample) -> np.random.Generator:
    """A generator seeded by the scene's content (image size and objects), not by where the scene came from."""
    content = json.dumps([sample.image.width, sample.image.height, [o.to_record() for o in sample.objects]])
    return np.random.default_rng(mix_seed(zlib.crc32(content.encode("utf-8")), _VQA_STREAM))


# ---------------------------------------------------------------------------------------------- questions


def instruction_items(
    sample: ShapesSample, config: ShapesConfig, split: Split, layout: bool = False
) -> list[InstructionItem]:
    """Caption, questions of every kind and grounding items for one scene, deterministic in the scene; with
    ``layout``, the grounded description as well (kind ``layout``: every object with its box, Kosmos-2's and
    Qwen-VL's grounded captions), which no default mix holds.

    ``split`` decides which absent (colour, shape) combinations an existence question may name: never a held-out
    one outside the held-out splits, so training data never mentions a held-out combination.
    """
    _check_split(split)
    rng = scene_rng(sample)
    objects = sample.objects
    items = [InstructionItem("caption", CAPTION_PROMPT, sample.captions[0])]
    items += _count_items(objects, config, split, rng)
    items += _attribute_items(objects)
    items += _spatial_items(objects, rng)
    items += _existence_items(objects, config, split, rng)
    items += _grounding_items(sample)
    if layout:
        items.append(InstructionItem("layout", LAYOUT_QUESTION, scene_layout(sample)))
    return items


def _count_items(
    objects: list[ShapesObject], config: ShapesConfig, split: Split, rng: np.random.Generator
) -> list[InstructionItem]:
    colours = Counter(o.colour for o in objects)
    shapes = Counter(o.shape for o in objects)
    combos = Counter((o.colour, o.shape) for o in objects)
    asked_colours = [c for c in config.colours if c in colours]
    asked_shapes = [s for s in config.shapes if s in shapes]
    # One absent colour and one absent shape, so that "0" is an answer the model must be able to give.
    absent_colours = [c for c in config.colours if c not in colours]
    absent_shapes = [s for s in config.shapes if s not in shapes]
    if absent_colours:
        asked_colours.append(absent_colours[int(rng.integers(len(absent_colours)))])
    if absent_shapes:
        asked_shapes.append(absent_shapes[int(rng.integers(len(absent_shapes)))])
    items = [InstructionItem("count", "how many objects are there?", str(len(objects)))]
    items += [InstructionItem("count", f"how many {c} objects are there?", str(colours[c])) for c in asked_colours]
    items += [InstructionItem("count", f"how many {_plural(s)} are there?", str(shapes[s])) for s in asked_shapes]
    # As many absent (colour, shape) combinations as present ones, from the combinations the split may name (as
    # existence questions do): were every combination asked about present, "how many red circles" would teach that
    # a named combination is always there, and the model answers "yes" to every existence question.
    absent_combos = [combo for combo in _nameable_combos(config, split) if combo not in combos]
    asked_combos = sorted(combos.items(), key=lambda pair: class_index(config, *pair[0]))
    asked_combos += [(absent_combos[k], 0) for k in rng.permutation(len(absent_combos))[: len(combos)]]
    items += [
        InstructionItem("count", f"how many {colour} {_plural(shape)} are there?", str(number))
        for (colour, shape), number in asked_combos
    ]
    return items


def _nameable_combos(config: ShapesConfig, split: Split) -> list[tuple[str, str]]:
    """The (colour, shape) combinations a question about ``split`` may name: never a held-out one outside
    the held-out splits, so training data never mentions a held-out combination."""
    return allowed_combos(config, "train") + (list(config.heldout) if is_heldout(split) else [])


def _attribute_items(objects: list[ShapesObject]) -> list[InstructionItem]:
    items: list[InstructionItem] = []
    for item in objects:
        if name := _unique_phrase(item, objects, [("shape",), ("size", "shape")]):
            items.append(InstructionItem("colour", f"what colour is the {name}?", item.colour))
        if name := _unique_phrase(item, objects, [("colour",), ("size", "colour")], noun="object"):
            items.append(InstructionItem("shape", f"what shape is the {name}?", item.shape))
        if name := _unique_phrase(item, objects, [("shape",), ("colour", "shape")]):
            items.append(InstructionItem("size", f"what size is the {name}?", item.size))
    return items


def _spatial_items(objects: list[ShapesObject], rng: np.random.Generator) -> list[InstructionItem]:
    names = {id(o): _unique_phrase(o, objects, _OBJECT_NAMES) for o in objects}
    items: list[InstructionItem] = []
    for a, asked, b, answer in _pairwise_relations(objects, names, rng):
        items.append(InstructionItem("spatial", f"is the {names[id(a)]} {asked} the {names[id(b)]}?", answer))
    for anchor, relation, target in _unique_neighbours(objects, names):
        anchor_name = names[id(anchor)]
        items.append(InstructionItem("spatial", f"what shape is {relation} the {anchor_name}?", target.shape))
        question = f"what colour is the shape {relation} the {anchor_name}?"
        items.append(InstructionItem("spatial", question, target.colour))
    return items


def _existence_items(
    objects: list[ShapesObject], config: ShapesConfig, split: Split, rng: np.random.Generator
) -> list[InstructionItem]:
    present = sorted({(o.colour, o.shape) for o in objects}, key=lambda combo: class_index(config, *combo))
    absent = [combo for combo in _nameable_combos(config, split) if combo not in present]
    asked = min(2, len(present), len(absent))  # as many "no" as "yes"
    chosen = [(present[k], "yes") for k in rng.permutation(len(present))[:asked]]
    chosen += [(absent[k], "no") for k in rng.permutation(len(absent))[:asked]]
    return [InstructionItem("existence", f"is there {_article(' '.join(combo))}?", answer) for combo, answer in chosen]


def _grounding_items(sample: ShapesSample) -> list[InstructionItem]:
    items = []
    for item in sample.objects:
        if name := _unique_phrase(item, sample.objects, _OBJECT_NAMES):
            box = normalise_box(item.box, sample.image.width, sample.image.height)
            answer = format_grounding(f"the {name}", box)
            items.append(InstructionItem("grounding", f"where is the {name}?", answer, box))
    return items


# ---------------------------------------------------------------------------------------------- text and export


def text_samples(sample: ShapesSample, config: ShapesConfig, split: Split) -> list[str]:
    """Text-only samples for language-model pre-training: every caption, and every item as
    ``question: ... answer: ...`` (short answers and ``<ref>``/``<box>`` strings), so that a language model that is
    later frozen (BLIP-2) can already produce the answer formats."""
    items = instruction_items(sample, config, split)
    return list(sample.captions) + [f"question: {item.question} answer: {item.answer}" for item in items]


def layout_objects(objects: Sequence[ShapesObject], image: Image.Image) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Each object's name (``size colour shape``) and box in ``image`` (``normalise_box``: corners in [0, 1000)) as
    ``scene_layout`` writes them."""
    return [(f"{o.size} {o.colour} {o.shape}", normalise_box(o.box, image.width, image.height)) for o in objects]


def scene_layout(sample: ShapesSample) -> str:
    """The scene as text with every object's place: its objects in order, each as ``size colour shape`` followed by
    its box (``format_box``, the corners grounding answers use), joined by "and"."""
    parts = layout_objects(sample.objects, sample.image)
    return " and ".join(f"{_article(name)} {format_box(box)}" for name, box in parts)


def described_conversations(
    sample: ShapesSample,
    config: ShapesConfig,
    split: Split,
    turns: int = 4,
    layout: bool = False,
    kinds: Sequence[str] = (),
) -> list[Conversation]:
    """The scene's items that its description answers as text-only conversations of up to ``turns`` turns in a
    seeded order, the description standing where the image stands in ``scene_conversation`` (right before the first
    question). The description is the scene's first caption, which answers all but spatial and grounding items (it
    gives no positions); with ``layout``, it is ``scene_layout`` (every object with its box), which answers every
    item. A language model trained on them answers from a description in its context; the bridge of a VLM is then
    trained to write that description (BLIP-2's frozen language model reads its Q-Former's tokens so). ``kinds``
    (empty: all) keeps the items of those kinds only."""
    items = instruction_items(sample, config, split)
    if not layout:
        items = [item for item in items if item.kind not in ("spatial", "grounding")]
    if kinds:
        items = [item for item in items if item.kind in kinds]
    description = scene_layout(sample) if layout else sample.captions[0]
    rng = np.random.default_rng(mix_seed(zlib.crc32(sample.captions[0].encode("utf-8")), _VQA_STREAM, 1))
    order = [items[k] for k in rng.permutation(len(items))]
    conversations = []
    for start in range(0, len(order), turns):
        chunk = order[start : start + turns]
        dialogue = item_turns(chunk, f"{description} {chunk[0].question}")
        conversations.append(Conversation(turns=dialogue, meta={"kinds": [item.kind for item in chunk]}))
    return conversations


def answer_format_corpus(config: ShapesConfig, split: Split, count: int, start: int = 0) -> Iterator[str]:
    """``text_samples`` of scenes ``start .. start + count - 1`` of ``split``, one string at a time."""
    for index in range(start, start + count):
        yield from text_samples(generate(config, split, index), config, split)


def scene_conversation(
    items: Sequence[InstructionItem], image: str | Image.Image, id: str | None = None
) -> Conversation:
    """One multi-turn conversation about one image: the image leads the first question (LLaVA's layout)."""
    if not items:
        raise ValueError("a conversation needs at least one item")
    turns = item_turns(items, f"{IMAGE_PLACEHOLDER}\n{items[0].question}")
    return Conversation(turns=turns, images=[image], id=id, meta={"kinds": [item.kind for item in items]})


def item_turns(items: Sequence[InstructionItem], first_question: str) -> list[Turn]:
    """User and assistant turns asking ``items`` in order; the first user turn reads ``first_question`` (the first
    item's question with what leads it: an image placeholder, or a description)."""
    turns: list[Turn] = []
    for number, item in enumerate(items):
        turns += [Turn("user", first_question if number == 0 else item.question), Turn("assistant", item.answer)]
    return turns


def given_away(item: InstructionItem, earlier: Sequence[str]) -> bool:
    """Whether ``earlier`` (a conversation's text before ``item``'s turn) answers ``item``: its answer, apart from
    yes / no and numbers, is words that all stand in that text ("what shape is the purple object? circle" gives
    away "what colour is the circle? purple")."""
    words = set(_WORD.findall(item.answer)) - {"yes", "no"}
    return bool(words) and words <= {word for text in earlier for word in _WORD.findall(text)}


def llava_entry(conversation: Conversation, image: str) -> dict[str, object]:
    """A conversation as one entry of LLaVA's JSON: ``from`` human/gpt/system, ``value``; ``meta`` keys kept."""
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    turns = [{"from": roles[turn.role], "value": turn.content} for turn in conversation.turns]
    entry: dict[str, object] = {"id": conversation.id, "image": image, "conversations": turns}
    return {**entry, **conversation.meta}


def write_llava(
    out_dir: str | Path, config: ShapesConfig, sizes: Mapping[str, int], progress: bool = True
) -> dict[str, Path]:
    """Write images/{split}/{index:06d}.png, one LLaVA conversation JSON ``llava_{split}.json`` per split (one
    multi-turn conversation per scene, with ``kinds``, ``objects``, ``width`` and ``height`` beside it) and
    shapes_config.json. Returns split -> JSON path; the same config and sizes give byte-identical files."""
    _check_sizes(config, sizes)
    root = Path(out_dir)
    written: dict[str, Path] = {}
    for split, count in sizes.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for index in tqdm(range(count), desc=f"shapes llava {split}", unit="img", disable=not progress):
            sample = generate(config, split, index)  # type: ignore[arg-type]
            relative = f"images/{split}/{index:06d}.png"
            sample.image.save(root / relative, format="PNG")
            items = instruction_items(sample, config, split)  # type: ignore[arg-type]
            conversation = scene_conversation(items, relative, id=f"{split}-{index:06d}")
            scene = {"objects": [o.to_record() for o in sample.objects], "width": sample.image.width}
            conversation.meta.update(scene, height=sample.image.height)
            entries.append(json.dumps(llava_entry(conversation, relative)))
        path = root / f"llava_{split}.json"
        # Written under a temporary name so an interrupted run never leaves a file that looks complete.
        partial = path.with_name(path.name + ".tmp")
        partial.write_text("[\n" + ",\n".join(entries) + "\n]\n", encoding="utf-8")
        os.replace(partial, path)
        written[split] = path
    settings = {"config": config.to_dict(), "sizes": dict(sizes), "format": "llava"}
    (root / "shapes_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return written
