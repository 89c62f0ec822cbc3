"""ShapesWorld: determinism, held-out separation, tight boxes, and annotations that agree with the scene."""

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkit.data.shapes import (
    BACKGROUND,
    COLOURS,
    DEFAULT_SHAPES,
    LETTERS,
    ShapesConfig,
    ShapesDataset,
    ShapesObject,
    ShapesSample,
    allowed_combos,
    class_index,
    class_names,
    colourless_copy,
    eval_splits,
    generate,
    shapes_main,
    single_object,
    write_shapes,
)

CONFIG = ShapesConfig()
SEEN_SPLITS = ("train", "val", "test")


def _samples(config: ShapesConfig, split: str, count: int) -> list[ShapesSample]:
    return [generate(config, split, index) for index in range(count)]


def _resolve(phrase: str, objects: list[ShapesObject]) -> list[ShapesObject]:
    """Objects a phrase such as "large circle", "red object" or "small red star" could refer to."""
    words = phrase.split()
    return [o for o in objects if all(w in (o.size, o.colour, o.shape, "shape", "object") for w in words)]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_default_config_palette_and_heldout() -> None:
    assert CONFIG.shapes == DEFAULT_SHAPES == ("circle", "square", "triangle", "star", "hexagon")
    assert len(CONFIG.colours) == 8 and set(CONFIG.colours) == set(COLOURS)
    assert len(CONFIG.heldout) == 8
    assert sorted(colour for colour, _ in CONFIG.heldout) == sorted(CONFIG.colours)
    assert {shape for _, shape in CONFIG.heldout} == set(CONFIG.shapes)
    rgbs = [*COLOURS.values(), BACKGROUND]
    for a, b in itertools.combinations(rgbs, 2):
        assert sum(abs(x - y) for x, y in zip(a, b, strict=True)) > 60, (a, b)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 8}, "at least 16"),
        ({"min_objects": 0}, "min_objects"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"shapes": ("circle", "blob")}, "unknown shapes"),
        ({"colours": ("red", "red")}, "unique"),
        ({"sizes": (("small", 0.0),)}, "fraction"),
        ({"sizes": (("tiny", 0.01),)}, "under"),
        ({"letter_probability": 1.5}, "letter_probability"),
        ({"heldout": (("red", "blob"),)}, "not in colours x shapes"),
        ({"heldout": (("red", "circle"), ("red", "circle"))}, "repeated"),
        ({"shapes": ("circle", "square")}, "diagonal_heldout"),
        ({"colours": ("red",), "shapes": ("circle",), "heldout": (("red", "circle"),)}, "every"),
        ({"aspect_ratios": (2.0, 1.0)}, "aspect_ratios"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShapesConfig(**overrides)


def test_config_json_round_trip() -> None:
    config = ShapesConfig(aspect_ratios=(0.5, 2.0), letter_probability=0.3, seed=7)
    assert ShapesConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_generate_is_deterministic_and_indexed() -> None:
    first, again = generate(CONFIG, "train", 5), generate(CONFIG, "train", 5)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.to_record() == again.to_record()
    others = [generate(CONFIG, "train", 6), generate(CONFIG, "val", 5), generate(ShapesConfig(seed=1), "train", 5)]
    assert all(other.to_record() != first.to_record() for other in others)
    with pytest.raises(ValueError, match="split"):
        generate(CONFIG, "dev", 0)  # type: ignore[arg-type]


def test_write_shapes_is_byte_identical(tmp_path: Path) -> None:
    sizes = {"train": 12, "val": 4, "test": 4, "test_heldout": 4}
    config = ShapesConfig(letter_probability=0.5)
    manifests = write_shapes(tmp_path / "a", config, sizes, progress=False)
    write_shapes(tmp_path / "b", config, sizes, progress=False)
    digest_a, digest_b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert digest_a == digest_b
    assert len([name for name in digest_a if name.endswith(".png")]) == sum(sizes.values())
    assert set(manifests) == set(sizes)
    lines = manifests["train"].read_text().splitlines()
    assert len(lines) == sizes["train"]
    record = json.loads(lines[3])
    assert record["image"] == "images/train/000003.png"
    assert record["caption"] == record["captions"][0]
    assert {"objects", "questions", "referring", "width", "height"} <= set(record)
    with Image.open(manifests["train"].parent / record["image"]) as image:
        assert image.size == (record["width"], record["height"])
        assert image.tobytes() == generate(config, "train", 3).image.tobytes()
    settings = json.loads((tmp_path / "a" / "shapes_config.json").read_text())
    assert ShapesConfig.from_dict(settings["config"]) == config and settings["sizes"] == sizes


def test_heldout_combos_only_in_the_heldout_splits() -> None:
    heldout = set(CONFIG.heldout)
    seen_in_train = set()
    for split in SEEN_SPLITS:
        for sample in _samples(CONFIG, split, 100):
            combos = {(o.colour, o.shape) for o in sample.objects}
            assert not combos & heldout, (split, combos & heldout)
            seen_in_train |= combos
            assert not heldout & {(o.colour, o.shape) for o in single_object(CONFIG, split, len(seen_in_train)).objects}
    assert seen_in_train == set(allowed_combos(CONFIG, "train"))
    for split in ("test_heldout", "val_heldout"):
        for index in range(100):
            assert {(o.colour, o.shape) for o in generate(CONFIG, split, index).objects} & heldout
            (item,) = single_object(CONFIG, split, index).objects
            assert (item.colour, item.shape) in heldout


def test_validation_splits_mirror_the_test_splits_with_other_scenes() -> None:
    assert eval_splits(CONFIG) == ("test", "test_heldout") and eval_splits(CONFIG, "val") == ("val", "val_heldout")
    assert eval_splits(ShapesConfig(heldout=()), "val") == ("val",)
    with pytest.raises(ValueError, match="'test' or 'val'"):
        eval_splits(CONFIG, "train")
    for test, val in (("test", "val"), ("test_heldout", "val_heldout")):
        images = {generate(CONFIG, test, index).image.tobytes() for index in range(50)}
        assert not images & {generate(CONFIG, val, index).image.tobytes() for index in range(50)}
    # An existence question about a held-out split may name an absent held-out combination, as about test_heldout.
    from vlkit.data.shapes_vqa import instruction_items

    def absent_heldout(split: str) -> set[tuple[str, str]]:
        named = set()
        for index in range(60):
            for item in instruction_items(generate(CONFIG, split, index), CONFIG, split):  # type: ignore[arg-type]
                if item.kind == "existence" and item.answer == "no":
                    named |= {combo for combo in CONFIG.heldout if f"{combo[0]} {combo[1]}?" in item.question}
        return named

    assert absent_heldout("val_heldout") and not absent_heldout("val")
    with pytest.raises(ValueError, match="val_heldout needs a non-empty config"):
        generate(ShapesConfig(heldout=()), "val_heldout", 0)


def test_boxes_inside_disjoint_and_tight() -> None:
    config = ShapesConfig(max_objects=5)
    counts = []
    for sample in _samples(config, "train", 150) + _samples(config, "test_heldout", 50):
        pixels = np.asarray(sample.image)
        height, width = pixels.shape[:2]
        counts.append(len(sample.objects))
        for a, b in itertools.combinations(sample.objects, 2):
            assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        for item in sample.objects:
            x1, y1, x2, y2 = item.box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            drawn = np.all(pixels[y1:y2, x1:x2] == COLOURS[item.colour], axis=-1)
            # Tight: the object's colour touches all four edges of its box.
            assert drawn[0].any() and drawn[-1].any() and drawn[:, 0].any() and drawn[:, -1].any()
        for colour, rgb in COLOURS.items():
            everywhere = np.all(pixels == rgb, axis=-1).sum()
            in_boxes = sum(
                np.all(pixels[o.box[1] : o.box[3], o.box[0] : o.box[2]] == rgb, axis=-1).sum()
                for o in sample.objects
                if o.colour == colour
            )
            assert everywhere == in_boxes, colour
    assert min(counts) >= 1 and max(counts) >= 4


def _check_question(question: str, answer: str, kind: str, objects: list[ShapesObject]) -> None:
    if kind == "count":
        if question == "how many shapes are there?":
            assert answer == str(len(objects))
            return
        word = re.fullmatch(r"how many (\w+?)(?: shapes)? are there\?", question).group(1)
        counted = [o for o in objects if word in (o.colour, o.shape + "s")]
        assert answer == str(len(counted)), question
    elif kind in ("colour", "shape", "size", "letter"):
        match = re.fullmatch(r"what (?:colour|shape|size|letter) is (?:on )?the (.+)\?", question)
        (item,) = _resolve(match.group(1), objects)
        assert answer == {"colour": item.colour, "shape": item.shape, "size": item.size, "letter": item.letter}[kind]
    elif kind == "existence":
        colour, shape = re.fullmatch(r"is there an? (\w+) (\w+)\?", question).groups()
        assert answer == ("yes" if any((o.colour, o.shape) == (colour, shape) for o in objects) else "no")
    elif question.startswith("what is"):
        relation, anchor_name = re.fullmatch(r"what is (left of|right of|above|below) the (.+)\?", question).groups()
        (anchor,) = _resolve(anchor_name, objects)
        on_side = [o for o in objects if o is not anchor and _side(o, anchor, relation)]
        assert len(on_side) == 1 and answer == f"{on_side[0].colour} {on_side[0].shape}", question
    else:
        a_name, relation, b_name = re.fullmatch(
            r"is the (.+) (left of|right of|above|below) the (.+)\?", question
        ).groups()
        ((a,), (b,)) = _resolve(a_name, objects), _resolve(b_name, objects)
        assert answer == ("yes" if _side(a, b, relation) else "no"), question


def _side(a: ShapesObject, b: ShapesObject, relation: str) -> bool:
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    return sign * (a.centre[axis] - b.centre[axis]) > 0


def test_annotations_agree_with_the_scene() -> None:
    kinds, answers = set(), {"yes": 0, "no": 0}
    config = ShapesConfig(max_objects=4, letter_probability=0.3)
    for sample in _samples(config, "train", 150) + _samples(config, "test_heldout", 50):
        objects = sample.objects
        assert len(sample.captions) >= 5 and len(set(sample.captions)) == len(sample.captions)
        for item in objects:
            full = f"{item.size} {item.colour} {item.shape}"
            assert sample.caption.count(full) == sum(f"{o.size} {o.colour} {o.shape}" == full for o in objects)
            for long_caption in sample.captions[2:5]:
                assert f"{item.colour} {item.shape}" in long_caption
            if item.letter:
                assert f"letter {item.letter}" in sample.caption
        existence = [qa.answer for qa in sample.questions if qa.kind == "existence"]
        assert existence.count("yes") == existence.count("no") >= 1
        for qa in sample.questions:
            _check_question(qa.question, qa.answer, qa.kind, objects)
            kinds.add(qa.kind)
            if qa.kind == "relation" and qa.answer in answers:
                answers[qa.answer] += 1
        for ref in sample.referring:
            _check_referring(ref.expression, ref.box, objects)
        json.dumps(sample.to_record())
    assert kinds == {"colour", "shape", "count", "relation", "existence", "letter", "size"}
    assert min(answers.values()) > 0.35 * sum(answers.values())


def _check_referring(expression: str, box: tuple[int, int, int, int], objects: list[ShapesObject]) -> None:
    (target,) = [o for o in objects if o.box == box]
    if match := re.fullmatch(r"the (leftmost|rightmost|topmost|bottommost) shape", expression):
        axis, pick = {"leftmost": (0, min), "rightmost": (0, max), "topmost": (1, min), "bottommost": (1, max)}[
            match.group(1)
        ]
        assert target.centre[axis] == pick(o.centre[axis] for o in objects)
    elif match := re.fullmatch(r"the shape (left of|right of|above|below) the (.+)", expression):
        (anchor,) = _resolve(match.group(2), objects)
        assert [o for o in objects if o is not anchor and _side(o, anchor, match.group(1))] == [target]
    elif match := re.fullmatch(r"the shape with the letter (\w)", expression):
        assert [o for o in objects if o.letter == match.group(1)] == [target]
    else:
        assert _resolve(expression.removeprefix("the "), objects) == [target], expression


def test_letters_are_drawn_and_recorded() -> None:
    config = ShapesConfig(letter_probability=1.0)
    for sample in _samples(config, "train", 40):
        pixels = np.asarray(sample.image)
        for item in sample.objects:
            assert item.letter is not None and item.letter in LETTERS
            region = pixels[item.box[1] : item.box[3], item.box[0] : item.box[2]]
            other = ~np.all(region == COLOURS[item.colour], axis=-1) & ~np.all(region == BACKGROUND, axis=-1)
            assert other.any(), "no letter pixels inside the object"
            if item.shape != "square":
                # The letter tile is pasted through the shape's mask: the box corner stays background.
                assert tuple(region[0, 0]) == BACKGROUND
            if [(o.size, o.colour, o.shape) for o in sample.objects].count((item.size, item.colour, item.shape)) == 1:
                assert any(qa.kind == "letter" and qa.answer == item.letter for qa in sample.questions)
    assert all(o.letter is None for s in _samples(CONFIG, "train", 20) for o in s.objects)


def test_aspect_ratio_mode_varies_size_at_fixed_budget() -> None:
    config = ShapesConfig(aspect_ratios=(0.5, 2.0))
    sizes = [generate(config, "train", index).image.size for index in range(40)]
    assert len(set(sizes)) >= 4
    for width, height in sizes:
        assert width % 8 == 0 and height % 8 == 0
        assert abs(width * height - 64 * 64) <= 0.2 * 64 * 64
        assert 0.5 / 1.25 <= width / height <= 2.0 * 1.25
    assert {generate(CONFIG, "train", index).image.size for index in range(10)} == {(64, 64)}


def test_class_names_and_single_object() -> None:
    names = class_names(CONFIG)
    assert len(names) == 40 and names[0] == "red circle" and len(set(names)) == 40
    for colour, shape in itertools.product(CONFIG.colours, CONFIG.shapes):
        assert names[class_index(CONFIG, colour, shape)] == f"{colour} {shape}"
    with pytest.raises(ValueError):
        class_index(CONFIG, "pink", "circle")
    classes = set()
    for index in range(200):
        sample = single_object(CONFIG, "train", index)
        (item,) = sample.objects
        classes.add((item.colour, item.shape))
        assert sample.caption == f"a {item.size} {item.colour} {item.shape}"
    assert classes == set(allowed_combos(CONFIG, "train"))


def test_dataset_generates_on_the_fly() -> None:
    dataset = ShapesDataset(CONFIG, "val", 10)
    assert len(dataset) == 10
    assert dataset[3].to_record() == generate(CONFIG, "val", 3).to_record()
    assert dataset[-1].to_record() == generate(CONFIG, "val", 9).to_record()
    with pytest.raises(IndexError):
        dataset[10]
    single = ShapesDataset(CONFIG, "test_heldout", 5, single_object=True)
    assert all(len(single[i].objects) == 1 for i in range(len(single)))


def test_shapes_main_writes_and_rejects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--train", "3", "--val", "2", "--test", "0", "--test-heldout", "2", "--quiet"]
    assert shapes_main([*argv, "--aspect-ratio-min", "0.5", "--aspect-ratio-max", "2", "--seed", "3"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["test_heldout.jsonl", "train.jsonl", "val.jsonl"]
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "shapes_config.json").read_text())["config"]["seed"] == 3
    assert shapes_main([*argv, "--val-heldout", "2"]) == 0
    assert len((tmp_path / "val_heldout.jsonl").read_text().splitlines()) == 2
    assert shapes_main([*argv, "--aspect-ratio-min", "0.5"]) == 2
    assert shapes_main([*argv, "--letter-probability", "2"]) == 2
    assert "letter_probability" in capsys.readouterr().err


def test_colourless_copy_repaints_every_object_grey_and_renames_its_colour() -> None:
    for index in range(6):
        sample = generate(CONFIG, "train", index)
        copy = colourless_copy(sample, 130)
        before, after = np.array(sample.image), np.array(copy.image)
        painted = np.zeros(before.shape[:2], dtype=bool)
        for item in sample.objects:
            painted |= (before == COLOURS[item.colour]).all(axis=-1)
        assert painted.any() and (after[painted] == 130).all()
        assert (after[~painted] == before[~painted]).all()  # background and nothing else untouched
        assert [(o.shape, o.size, o.box, o.colour) for o in copy.objects] == [
            (o.shape, o.size, o.box, "grey") for o in sample.objects
        ]
        words = {word for caption in copy.captions for word in re.findall(r"[a-z]+", caption)}
        assert "grey" in words and not words & set(COLOURS)
        assert not {word for ref in copy.referring for word in ref.expression.split()} & set(COLOURS)
        assert copy.questions == []
    with pytest.raises(ValueError, match="grey must be"):
        colourless_copy(generate(CONFIG, "train", 0), 40)  # the background's level


def test_recipe_training_records_add_the_colourless_copies_once(tmp_path: Path) -> None:
    from vlkit.data.specs import ShapesScenes, image_text_records
    from vlkit.recipes import get_recipe

    small = {"data.train_size": 80, "train.batch_size": 8, "data.colourless_copies": 0.0}
    recipe = get_recipe("siglip_shapes").with_overrides(small)
    grey = recipe.with_overrides({"data.colourless_copies": 0.25}).data
    records = image_text_records(grey, tmp_path / "data", False)
    copies = [record for record in records if "train_colourless" in record.image]
    assert len(records) == 100 and len(copies) == 20
    assert all("grey" in caption for record in copies for caption in record.captions)
    manifest = tmp_path / "data" / "train_colourless.jsonl"
    written = manifest.stat().st_mtime_ns
    assert len(image_text_records(grey, tmp_path / "data", False)) == 100  # reused, not rendered again
    assert manifest.stat().st_mtime_ns == written
    assert len(image_text_records(recipe.data, tmp_path / "data", False)) == 80  # other settings: rendered anew
    assert not manifest.exists()
    with pytest.raises(ValueError, match="colourless_copies"):
        recipe.with_overrides({"data.colourless_copies": 1.5})
    assert isinstance(grey, ShapesScenes)
