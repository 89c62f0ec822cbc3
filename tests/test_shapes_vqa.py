"""ShapesWorld instruction data: every answer recomputed from the scene's objects, no ambiguous question, balanced
yes/no, boxes in Qwen-VL's [0, 1000) format, held-out combinations kept out of training, determinism."""

import re
from collections import Counter

import pytest
from PIL import Image

from vlkit.data.shapes import ShapesConfig, ShapesDataset, ShapesObject, ShapesSample, generate
from vlkit.data.shapes_vqa import (
    CAPTION_PROMPT,
    KINDS,
    LAYOUT_QUESTION,
    InstructionItem,
    answer_format_corpus,
    described_conversations,
    instruction_items,
    normalise_box,
    scene_conversation,
    scene_layout,
    text_samples,
)
from vlkit.eval.captioning import caption_mentions
from vlkit.eval.grounding import parse_groundings

CONFIG = ShapesConfig(max_objects=4)
SCENES = [generate(CONFIG, "train", index) for index in range(120)]
PLURALS = {shape + ("es" if shape.endswith("x") else "s"): shape for shape in CONFIG.shapes}


def _resolve(phrase: str, objects: list[ShapesObject]) -> list[ShapesObject]:
    """The objects a phrase ("circle", "small red object", "blue square") can mean."""
    words = phrase.split()
    return [o for o in objects if all(w in (o.size, o.colour, o.shape, "object", "shape") for w in words)]


def _one(phrase: str, objects: list[ShapesObject]) -> ShapesObject:
    matches = _resolve(phrase, objects)
    assert len(matches) == 1, f"{phrase!r} is ambiguous or names nothing: {matches}"
    return matches[0]


def _strictly(relation: str, a: ShapesObject, b: ShapesObject) -> bool:
    """a is <relation> b with the two boxes separated on that axis."""
    return {
        "left of": a.box[2] <= b.box[0],
        "right of": b.box[2] <= a.box[0],
        "above": a.box[3] <= b.box[1],
        "below": b.box[3] <= a.box[1],
    }[relation]


def _by_centre(relation: str, a: ShapesObject, b: ShapesObject) -> bool:
    axis = 0 if relation in ("left of", "right of") else 1
    before = a.centre[axis] < b.centre[axis]
    return before if relation in ("left of", "above") else a.centre[axis] > b.centre[axis]


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION = r"(left of|right of|above|below)"


def _expected_answer(question: str, sample: ShapesSample) -> str:
    """Recompute the answer of one question from the scene's objects."""
    objects = sample.objects
    if question == "how many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o.colour == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o.shape == PLURALS[m[1]] for o in objects))
    if m := re.fullmatch(r"how many (\w+) (\w+) are there\?", question):
        return str(sum(o.colour == m[1] and o.shape == PLURALS[m[2]] for o in objects))
    if m := re.fullmatch(rf"what (shape|colour) is (?:the shape )?{RELATION} the ([\w ]+?)\?", question):
        anchor = _one(m[3], objects)
        others = [o for o in objects if o is not anchor]
        strictly = [o for o in others if _strictly(m[2], o, anchor)]
        assert len(strictly) == 1 and [o for o in others if _by_centre(m[2], o, anchor)] == strictly, question
        return getattr(strictly[0], m[1])
    if m := re.fullmatch(r"what (colour|shape|size) is the ([\w ]+?)\?", question):
        return getattr(_one(m[2], objects), m[1])
    if m := re.fullmatch(rf"is the ([\w ]+?) {RELATION} the ([\w ]+?)\?", question):
        a, b = _one(m[1], objects), _one(m[3], objects)
        holds, opposite = _strictly(m[2], a, b), _strictly(OPPOSITE[m[2]], a, b)
        assert holds != opposite, f"{question!r}: the boxes overlap on that axis"
        return "yes" if holds else "no"
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objects) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_every_answer_is_right_for_its_scene() -> None:
    kinds: Counter[str] = Counter()
    for sample in SCENES:
        for item in instruction_items(sample, CONFIG, "train"):
            kinds[item.kind] += 1
            if item.kind == "caption":
                assert (item.question, item.answer) == (CAPTION_PROMPT, sample.captions[0])
                assert caption_mentions(item.answer) == Counter((o.colour, o.shape) for o in sample.objects)
            elif item.kind == "grounding":
                phrase = re.fullmatch(r"where is the ([\w ]+)\?", item.question)[1]
                target = _one(phrase, sample.objects)
                (grounding,) = parse_groundings(item.answer)
                assert grounding.ref == f"the {phrase}"
                width, height = sample.image.size
                x1, y1, x2, y2 = target.box
                expected = (x1 * 1000 // width, y1 * 1000 // height, x2 * 1000 // width, y2 * 1000 // height)
                assert grounding.box == item.box == tuple(min(999, value) for value in expected)
            else:
                assert item.answer == _expected_answer(item.question, sample), item
                assert len(item.answer.split()) == 1, item
    assert set(kinds) == set(KINDS), kinds
    assert min(kinds.values()) >= 50, kinds


def test_identical_objects_are_never_asked_about() -> None:
    twin = ShapesObject("circle", "red", "small", (4, 4, 20, 20))
    objects = [
        twin,
        ShapesObject("circle", "red", "small", (40, 40, 56, 56)),
        ShapesObject("square", "blue", "large", (4, 36, 30, 62)),
    ]
    sample = ShapesSample(Image.new("RGB", (64, 64)), objects, ["a small red circle"], [], [])
    items = instruction_items(sample, CONFIG, "train")
    for item in items:
        if item.kind not in ("caption", "count", "existence"):
            assert "circle" not in item.question and "red object" not in item.question, item
    answers = {item.question: item.answer for item in items}
    assert answers["how many red circles are there?"] == "2"
    assert answers["what colour is the square?"] == "blue"
    assert answers["is there a red circle?"] == "yes"
    assert [item.answer for item in items if item.kind == "grounding"] == [
        "<ref>the blue square</ref><box>(62,562),(468,968)</box>"
    ]


def test_yes_and_no_are_balanced() -> None:
    existence, spatial = Counter(), Counter()
    for sample in SCENES:
        items = instruction_items(sample, CONFIG, "train")
        scene = Counter(item.answer for item in items if item.kind == "existence")
        assert scene["yes"] == scene["no"] >= 1
        existence += scene
        spatial += Counter(item.answer for item in items if item.kind == "spatial" and item.answer in ("yes", "no"))
    assert 0.35 < spatial["yes"] / (spatial["yes"] + spatial["no"]) < 0.65, spatial
    assert existence["yes"] == existence["no"]


def test_count_questions_name_absent_combinations_as_often_as_present_ones() -> None:
    # Were every (colour, shape) a count question names present, the questions would teach that a named combination
    # is always there, and a model trained on them answers "yes" to every existence question.
    combo = re.compile(r"how many (\w+) (?!objects)(\w+) are there\?")
    for sample in SCENES:
        answers = [item.answer for item in instruction_items(sample, CONFIG, "train") if combo.fullmatch(item.question)]
        present = len({(o.colour, o.shape) for o in sample.objects})
        assert len(answers) == 2 * present and answers.count("0") == present, answers


def test_heldout_combinations_stay_out_of_training_text() -> None:
    heldout = [f"{colour} {shape}" for colour, shape in CONFIG.heldout]
    for sample in SCENES:
        for text in text_samples(sample, CONFIG, "train"):
            assert not any(combo in text for combo in heldout), text
    mentioned = set()
    for index in range(30):
        sample = generate(CONFIG, "test_heldout", index)
        for item in instruction_items(sample, CONFIG, "test_heldout"):
            mentioned |= {combo for combo in heldout if combo in item.question}
    assert mentioned, "test_heldout questions should ask about held-out combinations"


def test_items_are_deterministic_in_the_scene() -> None:
    first = instruction_items(SCENES[7], CONFIG, "train")
    again = instruction_items(ShapesDataset(CONFIG, "train", 10)[7], CONFIG, "train")
    assert first == again
    assert instruction_items(SCENES[8], CONFIG, "train") != first


def test_normalise_box() -> None:
    assert normalise_box((0, 0, 64, 64), 64, 64) == (0, 0, 999, 999)
    assert normalise_box((16, 8, 32, 40), 64, 80) == (250, 100, 500, 500)
    assert normalise_box((1, 1, 2, 2), 3, 3) == (333, 333, 666, 666)
    for bad in ((0, 0, 65, 10), (10, 0, 10, 5), (-1, 0, 4, 4)):
        with pytest.raises(ValueError, match="not inside"):
            normalise_box(bad, 64, 64)


def test_text_samples_cover_the_answer_formats() -> None:
    sample = SCENES[3]
    texts = text_samples(sample, CONFIG, "train")
    items = instruction_items(sample, CONFIG, "train")
    assert texts[: len(sample.captions)] == sample.captions
    assert texts[len(sample.captions) :] == [f"question: {i.question} answer: {i.answer}" for i in items]
    corpus = list(answer_format_corpus(CONFIG, "train", count=5))
    assert any(re.search(r"answer: <ref>the [\w ]+</ref><box>\(\d+,\d+\),\(\d+,\d+\)</box>$", t) for t in corpus)
    assert any(text.endswith("answer: yes") for text in corpus) and any(text.endswith("answer: 0") for text in corpus)


def test_scene_conversation_layout() -> None:
    items = instruction_items(SCENES[0], CONFIG, "train")
    conversation = scene_conversation(items, "images/0.png", id="s0")
    assert conversation.images == ["images/0.png"]
    assert conversation.turns[0].content == "<image>\n" + items[0].question
    assert [turn.content for turn in conversation.turns[1::2]] == [item.answer for item in items]
    assert conversation.meta["kinds"] == [item.kind for item in items]


def test_described_conversations_put_the_caption_where_the_image_goes() -> None:
    for sample in SCENES[:20]:
        conversations = described_conversations(sample, CONFIG, "train", turns=3)
        items = [i for i in instruction_items(sample, CONFIG, "train") if i.kind not in ("spatial", "grounding")]
        asked = []
        for conversation in conversations:
            assert not conversation.images and 1 <= len(conversation.turns) // 2 <= 3
            assert [turn.role for turn in conversation.turns] == ["user", "assistant"] * (len(conversation.turns) // 2)
            first = conversation.turns[0].content
            assert first.startswith(sample.captions[0] + " ")
            questions = [first[len(sample.captions[0]) + 1 :]] + [t.content for t in conversation.turns[2::2]]
            asked += list(zip(questions, [t.content for t in conversation.turns[1::2]], strict=True))
        # Every item the caption answers is asked exactly once, with its answer; positions and boxes never.
        assert sorted(asked) == sorted((i.question, i.answer) for i in items)
    assert described_conversations(SCENES[5], CONFIG, "train") == described_conversations(SCENES[5], CONFIG, "train")


def test_scene_layout_names_every_object_with_its_grounding_box() -> None:
    for sample in SCENES[:40]:
        layout = scene_layout(sample)
        parts = layout.split(" and ")
        assert len(parts) == len(sample.objects)
        for part, obj in zip(parts, sample.objects, strict=True):
            box = normalise_box(obj.box, sample.image.width, sample.image.height)
            assert part == f"{'an' if obj.size[0] in 'aeiou' else 'a'} {obj.size} {obj.colour} {obj.shape} " + (
                "<box>({},{}),({},{})</box>".format(*box)
            )
        # Every grounding answer's box is in the layout: a reader of the layout can copy it.
        for item in instruction_items(sample, CONFIG, "train"):
            if item.kind == "grounding":
                assert item.answer[item.answer.index("<box>") :] in layout


def test_layout_described_conversations_ask_every_item() -> None:
    for sample in SCENES[:20]:
        layout = scene_layout(sample)
        conversations = described_conversations(sample, CONFIG, "train", turns=4, layout=True)
        asked = []
        for conversation in conversations:
            first = conversation.turns[0].content
            assert first.startswith(layout + " ")
            questions = [first[len(layout) + 1 :]] + [t.content for t in conversation.turns[2::2]]
            asked += list(zip(questions, [t.content for t in conversation.turns[1::2]], strict=True))
        assert sorted(asked) == sorted((i.question, i.answer) for i in instruction_items(sample, CONFIG, "train"))


def test_the_layout_item_is_asked_only_when_named() -> None:
    for sample in SCENES[:20]:
        items = instruction_items(sample, CONFIG, "train")
        with_layout = instruction_items(sample, CONFIG, "train", layout=True)
        assert "layout" not in {item.kind for item in items}
        assert with_layout[:-1] == items
        assert with_layout[-1] == InstructionItem("layout", LAYOUT_QUESTION, scene_layout(sample))
    # The language model's text is unchanged: no layout answer there.
    assert not any(LAYOUT_QUESTION in text for text in text_samples(SCENES[0], CONFIG, "train"))
