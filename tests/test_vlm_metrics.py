"""VQA exact match (normalised, per kind), grounding parsing and IoU accuracy, layouts (every object named with its
box), and caption attribute P/R/F1."""

import random
from collections import Counter

import pytest

from vlkit.data.shapes import ShapesConfig, ShapesObject, generate
from vlkit.data.shapes_vqa import format_grounding, normalise_box, scene_layout
from vlkit.eval.captioning import caption_mentions, caption_scores
from vlkit.eval.grounding import (
    Grounding,
    box_iou,
    grounding_accuracy,
    layout_accuracy,
    parse_box,
    parse_groundings,
    parse_layout,
)
from vlkit.eval.vqa import normalise_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Red", "red"),
        ("  red. ", "red"),
        ("Three", "3"),
        ("3", "3"),
        ("The answer is: Yes!", "answer is yes"),
        ("a circle", "circle"),
        ("An Orange   square,", "orange square"),
        ("zero", "0"),
        ("A", "a"),  # a letter answer that is an article stays
        ("-1", "-1"),
        ("+3.", "+3"),
        ("2.5", "2.5"),
        ("Café.", "café"),  # letters of every script are kept, not taken for punctuation
        ("红色", "红色"),
    ],
)
def test_normalise_answer(text: str, normalised: str) -> None:
    assert normalise_answer(text) == normalised


def test_vqa_accuracy_overall_and_per_kind() -> None:
    predictions = ["Red.", "three", "no", "blue", "Yes", None, "2"]
    references = ["red", "3", "yes", "green", "yes", "no", ["two", "2 shapes"]]
    kinds = ["colour", "count", "spatial", "colour", "existence", "existence", "count"]
    result = vqa_accuracy(predictions, references, kinds)  # type: ignore[arg-type]
    assert result.correct == [True, True, False, False, True, False, True]
    assert result.accuracy == pytest.approx(4 / 7)
    assert result.per_kind == {"colour": 0.5, "count": 1.0, "spatial": 0.0, "existence": 0.5}
    assert result.counts == {"colour": 2, "count": 2, "spatial": 1, "existence": 2}
    assert result.as_dict()["vqa_accuracy"] == pytest.approx(4 / 7)
    assert result.as_dict()["vqa_accuracy_count"] == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        vqa_accuracy(["a", "b"], ["a"])
    # Nothing, an article alone or a sign is no answer: it never matches, whatever the reference normalises to.
    assert vqa_accuracy(["", "the", "?", "A", "-1", "+3"], ["A", "A", "A", "A", "1", "3"]).correct == [
        False, False, False, True, False, False,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no questions"):
        vqa_accuracy([], [])


def test_grounding_round_trips_through_the_parser() -> None:
    generator = random.Random(0)
    for _ in range(200):
        x1, x2 = sorted(generator.sample(range(1000), 2))
        y1, y2 = sorted(generator.sample(range(1000), 2))
        text = "sure: " + format_grounding("the red circle", (x1, y1, x2, y2)) + " done"
        assert parse_groundings(text) == [Grounding("the red circle", (x1, y1, x2, y2))]


def test_parser_reorders_corners_and_reads_several_boxes() -> None:
    assert parse_box("<box>(700,900),(100,200)</box>") == (100, 200, 700, 900)
    assert parse_box("<box>( 10 , 20 ) , ( 30 , 40 )</box>") == (10, 20, 30, 40)
    text = "<ref>a</ref><box>(1,2),(3,4)</box> and <ref>b</ref> <box>(5,6),(7,8)</box><box>(9,9),(20,20)</box>"
    assert parse_groundings(text) == [
        Grounding("a", (1, 2, 3, 4)),
        Grounding("b", (5, 6, 7, 8)),
        Grounding(None, (9, 9, 20, 20)),
    ]
    # The first *valid* box counts: an out-of-range one before it is skipped.
    assert parse_box("<box>(0,0),(1000,10)</box><box>(1,1),(2,2)</box>") == (1, 1, 2, 2)


MALFORMED = [
    "",
    "the red circle is at the top left",
    "<ref>the red circle</ref>",
    "<box>(1,2),(3)</box>",
    "<box>(1.5,2),(30,40)</box>",
    "<box>(10,20),(30,40)",
    "<box>10,20,30,40</box>",
    "<box>(0,0),(1000,10)</box>",
    "<box>(-5,0),(10,10)</box>",
    "<box>(5,5),(5,9)</box>",
    "<box>(" + "9" * 5000 + ",1),(2,3)</box>",
    "<box>(a,b),(c,d)</box>",
    "<ref><ref><box><box>(((((",
    "\x00\uffff<box>(1,2),(3,4)</bo>",
    "<box>(\uff11\uff10,\uff12\uff10),(\uff15\uff10,\uff16\uff10)</box>",  # full-width digits: not the format's
    "<box>(\u0661\u0660,\u0662\u0660),(\u0665\u0660,\u0666\u0660)</box>",  # Arabic-Indic digits
]


def test_malformed_outputs_score_zero_without_raising() -> None:
    for text in MALFORMED:
        assert parse_box(text) is None, text
    for nothing in (None, 17, b"<box>(1,2),(3,4)</box>"):
        assert parse_groundings(nothing) == []
    result = grounding_accuracy(MALFORMED, [(10, 20, 30, 40)] * len(MALFORMED))
    assert result.accuracy == 0.0 and result.parsed == 0.0 and result.mean_iou == 0.0


def test_iou_of_known_boxes() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (0, 0, 5, 10)) == pytest.approx(0.5)
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)


def test_grounding_accuracy_at_iou_half() -> None:
    target = (100, 100, 200, 200)
    predictions = [
        format_grounding("the red circle", target),  # IoU 1: hit
        "<box>(100,100),(150,200)</box>",  # IoU exactly 0.5: a hit at >= 0.5
        "<ref>x</ref><box>(150,100),(250,200)</box>",  # IoU 1/3: miss
        "<box>(100,100),(200,200",  # unclosed: miss
    ]
    result = grounding_accuracy(predictions, [target] * 4)
    assert result.ious == pytest.approx([1.0, 0.5, 1 / 3, 0.0])
    assert result.accuracy == 0.5
    assert result.parsed == 0.75
    assert result.mean_iou == pytest.approx((1 + 0.5 + 1 / 3) / 4)
    assert result.as_dict()["grounding_acc50"] == 0.5
    with pytest.raises(ValueError, match="not a box"):
        grounding_accuracy(["x"], [(5, 5, 5, 9)])


def test_a_scene_layout_parses_back_into_its_objects_and_scores_one() -> None:
    config = ShapesConfig(max_objects=4)
    for index in range(30):
        sample = generate(config, "train", index)
        targets = [(f"{o.size} {o.colour} {o.shape}", normalise_box(o.box, sample.image.width, sample.image.height))
                   for o in sample.objects]  # fmt: skip
        assert parse_layout(scene_layout(sample)) == targets
        # The BPE's decoding puts spaces inside the tags; the order of the objects does not matter.
        spaced = " and ".join(reversed(scene_layout(sample).replace("<box>", "<box> ").split(" and ")))
        result = layout_accuracy([spaced], [targets])
        assert (result.accuracy, result.named, result.count) == (1.0, 1.0, len(targets))


def test_layout_accuracy_needs_the_right_name_and_box_and_uses_each_part_once() -> None:
    red, blue = ("small red circle", (100, 100, 200, 200)), ("large blue square", (500, 500, 800, 800))
    predictions = [
        "a small red circle <box>(100,100),(200,200)</box> and a large blue square <box>(500,500),(800,800)</box>",
        "a small red circle <box>(100,100),(150,200)</box> and a large blue square <box>(0,0),(100,100)</box>",
        "a small red square <box>(100,100),(200,200)</box>",  # the box of the circle named as a square
        "a small red circle <box>(100,100),(200,200)</box>",  # one part for two identical objects
        "a small red circle <box>(100,100),(200,200",  # unclosed
        "",
    ]
    targets = [[red, blue], [red, blue], [red], [red, red], [red], [red]]
    result = layout_accuracy(predictions, targets)
    # Hits: both objects of the first, the circle (IoU 0.5) of the second, one of the two identical circles.
    assert result.count == 9 and result.accuracy == pytest.approx(4 / 9)
    # Named with a valid box: the first two's four objects and one of the identical pair (the second finds the one
    # part already used).
    assert result.named == pytest.approx(5 / 9)
    assert result.as_dict() == {"layout_acc50": result.accuracy, "layout_named": result.named}
    # Two objects of one name: the part placed on the second counts, whichever the layout lists first.
    other = ("small red circle", (500, 500, 600, 600))
    swapped = "a small red circle <box>(500,500),(600,600)</box> and a small red circle <box>(0,0),(50,50)</box>"
    assert layout_accuracy([swapped], [[red, other]]).accuracy == 0.5
    assert layout_accuracy([swapped], [[other, red]]).accuracy == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        layout_accuracy(["", ""], [[red]])
    with pytest.raises(ValueError, match="no layout targets"):
        layout_accuracy([""], [[]])


@pytest.mark.parametrize(
    ("caption", "mentions"),
    [
        ("two red circles and a blue square", {("red", "circle"): 2, ("blue", "square"): 1}),
        ("A small red circle with the letter A", {("red", "circle"): 1}),
        ("3 large green stars", {("green", "star"): 3}),
        ("red circles everywhere", {("red", "circle"): 2}),
        ("two small purple crosses, one cyan hexagon", {("purple", "cross"): 2, ("cyan", "hexagon"): 1}),
        ("a circle and two red shapes", {}),
        ("a red large square", {("red", "square"): 1}),
        ("from left to right: a red circle, a red circle", {("red", "circle"): 2}),
        ("a blue square and no red circles", {("blue", "square"): 1}),
        # A digit run longer than a count is no number: the plural counts as two, and nothing can make int() fail.
        ("12345678901234567890 red circles", {("red", "circle"): 2}),
        ("9" * 5000 + " red circle", {("red", "circle"): 1}),
    ],
)
def test_caption_mentions(caption: str, mentions: dict[tuple[str, str], int]) -> None:
    assert caption_mentions(caption) == Counter(mentions)


def test_caption_scores() -> None:
    red_circle = ShapesObject("circle", "red", "small", (0, 0, 5, 5))
    truth = [[red_circle, red_circle, ("blue", "square")], [("green", "star")]]
    captions = ["a red circle and a blue square and a green star", "nothing recognisable"]
    result = caption_scores(captions, truth)
    # Matched: red circle 1 + blue square 1 = 2; predicted 3; true 4.
    assert result.precision == pytest.approx(2 / 3)
    assert result.recall == pytest.approx(2 / 4)
    assert result.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert result.exact == 0.0
    assert result.as_dict()["caption_f1"] == pytest.approx(result.f1)


def test_shapesworld_captions_score_perfectly() -> None:
    config = ShapesConfig(max_objects=4)
    samples = [generate(config, "train", index) for index in range(40)]
    for variant in (0, 1, 3):  # the captions that name every object by colour and shape
        result = caption_scores([s.captions[variant] for s in samples], [s.objects for s in samples])
        assert (result.precision, result.recall, result.f1, result.exact) == (1.0, 1.0, 1.0, 1.0)
    wrong = caption_scores([samples[1].captions[0]] * 40, [s.objects for s in samples])
    assert wrong.f1 < 0.5
