"""The wrong answers of a trained ShapesWorld VLM, per question kind, with the objects of each scene.

Asks the questions ``vlkit eval`` asks, built as it builds them from the model directory's ``recipe.json`` (one of
each kind per test scene), judges them by the VQA metric's own answer normalisation, and writes every wrong answer as
JSON lines ``{kind, question, answer, truth, objects: [[size, colour, shape], ...], split}``, printing a count per
kind and the first ``--show`` of each for the seen colour x shape combinations. A line per split sorts the wrong
colour, shape and size answers: naming another object's attribute (bound to the wrong object) or one no object of the
scene has (a prior: on held-out combinations, the shapes a colour came with in training; docs/experiments.md, the
forty-second session). The experiment log's "Learning curves" reads binding errors off this list: a wrong colour
answer that is the other object's colour.

Referring expressions are judged as the grounding metric judges them (IoU >= 0.5): a miss is written with both boxes,
and a line per split says where the parsed boxes err, as the median and mean distance of the box centre along x and
along y and of the width and height from the true box, in the [0, 1000) coordinates the model writes, and the
correlation of the predicted with the true centre along each axis. The README's
"Where the column is lost" reads ``llava_shapes``' misplaced boxes off it (right size and row, wrong
column). A second line per split tells a box on the wrong object from a box on none: the answers at IoU >= 0.5 with
the referred object, with any object of the scene, and on the scenes of one object (nothing to bind), and how often
the object whose centre is nearest the box's is the referred one. The experiment log's BLIP-2 section of the
thirty-first session reads the frozen LM's boxes off it (on no object, one-object scenes as two).

    python bench/vlm_errors.py --model RUN/model --out errors.jsonl [--show 12] [--split val]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit.data.shapes import EVAL_SPLITS, is_heldout
from vlkit.data.shapes_vqa import normalise_box
from vlkit.eval.grounding import box_iou, parse_box
from vlkit.eval.vqa import normalise_answer
from vlkit.files import read_json
from vlkit.hub import from_pretrained
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes.base import recipe_from_dict
from vlkit.tasks.base import RunContext
from vlkit.tasks.vlm import VLMEvaluation

NOT_VQA = ("caption", "grounding")
ATTRIBUTES = ("colour", "shape", "size")  # the kinds whose answer names one object's attribute


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a VLM model directory a recipe run wrote")
    parser.add_argument("--out", required=True, help="JSON lines of the wrong answers")
    parser.add_argument("--show", type=int, default=12, help="wrong answers printed per kind")
    parser.add_argument("--split", default="test", choices=EVAL_SPLITS,
                        help="the scenes asked about (wrong answers listed: its seen combinations)")  # fmt: skip
    args = parser.parse_args(argv)

    model = from_pretrained(args.model).eval()
    if not isinstance(model, VisionLanguageModel):
        parser.error(f"{args.model} holds no vision-language model")
    recipe = recipe_from_dict(read_json(Path(args.model) / "recipe.json"))
    if hasattr(recipe.data, "eval_split"):
        recipe = recipe.with_overrides({"data.eval_split": args.split})
    with tempfile.TemporaryDirectory() as scratch:
        evaluation = recipe.task.evaluation(RunContext(recipe, Path(scratch), progress=False), model)
    if not isinstance(evaluation, VLMEvaluation):
        parser.error(f"{args.model}: recipe {recipe.name} does not evaluate by asking questions")
    with torch.no_grad():
        answers = evaluation.answer(model)
    config = recipe.data.config
    names = {"colour": config.colours, "shape": config.shapes, "size": [name for name, _ in config.sizes]}
    wrong: dict[str, list[dict[str, object]]] = defaultdict(list)
    box_errors: dict[str, list[list[float]]] = defaultdict(list)  # split -> [|dx|, |dy|, |dw|, |dh|] per parsed box
    centres: dict[str, list[list[float]]] = defaultdict(list)  # split -> [x, y, true x, true y] per parsed box
    # split -> per referring expression: [hit the referred, hit any object, one-object scene, nearest is the referred]
    objects_hit: dict[str, list[list[bool]]] = defaultdict(list)
    wrong_heldout: list[dict[str, object]] = []  # the held-out split's wrong VQA answers, written, not printed
    attributes: dict[str, list[str]] = defaultdict(list)  # split -> "right" / "other" / "absent" per attribute answer
    for question, answer in zip(evaluation.questions, answers, strict=True):
        seen = not is_heldout(question.split)
        if question.kind == "grounding" and question.box is not None:
            box = parse_box(answer)
            objects_hit[question.split].append(_objects_hit(box, question))
            if box is not None:
                box_errors[question.split].append(_box_error(box, question.box))
                centres[question.split].append([*_centre(box), *_centre(question.box)])
            if seen and (box is None or box_iou(box, question.box) < 0.5):
                predicted = None if box is None else list(box)
                wrong["grounding"].append({"kind": "grounding", "question": question.question, "answer": answer,
                                           "truth": list(question.box), "box": predicted,
                                           "split": question.split})  # fmt: skip
        if question.kind not in NOT_VQA and normalise_answer(answer) != normalise_answer(question.answer):
            objects = [[o.size, o.colour, o.shape] for o in question.objects]
            row = {"kind": question.kind, "question": question.question, "answer": answer, "truth": question.answer,
                   "objects": objects, "split": question.split}  # fmt: skip
            (wrong[question.kind] if seen else wrong_heldout).append(row)
        if question.kind in ATTRIBUTES:
            attributes[question.split].append(_attribute_answer(question, answer, names[question.kind]))
    rows = [row for rows in wrong.values() for row in rows] + wrong_heldout
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    for kind, rows in wrong.items():
        print(f"{kind}: {len(rows)} wrong")
        for row in rows[: args.show]:
            print(f"  {row['question']} -> {row['answer']} (true: {row['truth']}) {row.get('objects', '')}")
    for split, errors in box_errors.items():
        table = np.array(errors)
        names = ("centre x", "centre y", "width", "height")
        columns = zip(names, np.median(table, 0), table.mean(0), strict=True)
        cells = ", ".join(f"{name} {median:.0f} / {mean:.0f}" for name, median, mean in columns)
        points = np.array(centres[split])
        corr = [np.corrcoef(points[:, axis], points[:, axis + 2])[0, 1] for axis in (0, 1)]
        print(f"grounding, {split} ({len(errors)} parsed boxes), |error| median / mean: {cells}; correlation of the "
              f"predicted with the true centre: x {corr[0]:.2f}, y {corr[1]:.2f}")  # fmt: skip
    for split, rows in objects_hit.items():
        hits = np.array(rows, dtype=bool)  # (Q, 4)
        alone = hits[hits[:, 2]]
        on_alone = f"{alone[:, 0].mean():.1%} of {len(alone)}" if len(alone) else "none asked"
        print(f"grounding, {split} ({len(hits)} referring expressions), IoU >= 0.5 with the referred object "
              f"{hits[:, 0].mean():.1%}, with any object of the scene {hits[:, 1].mean():.1%}, on one-object scenes "
              f"{on_alone}; the object nearest the box is the referred one {hits[:, 3].mean():.1%}")  # fmt: skip
    for split, verdicts in attributes.items():
        asked, counts = len(verdicts), {verdict: verdicts.count(verdict) for verdict in ("other", "absent", "else")}
        print(f"colour / shape / size answers, {split}: {asked - verdicts.count('right')} wrong of {asked}, "
              f"{counts['other']} naming another object's (binding), {counts['absent']} one no object of the scene "
              f"has (a prior), {counts['else']} not an attribute")  # fmt: skip


def _attribute_answer(question: Any, answer: str, names: Sequence[str]) -> str:
    """Whether a colour / shape / size answer is ``"right"``, names the attribute of ``"other"`` objects of the scene
    only (bound to the wrong object), names one no object has (``"absent"``: read from elsewhere, such as which shapes
    a colour came with in training), or is ``"else"``."""
    said = normalise_answer(answer)
    if said == normalise_answer(question.answer):
        return "right"
    values = {normalise_answer(getattr(o, question.kind)) for o in question.objects}
    if said in values:
        return "other"
    return "absent" if said in {normalise_answer(name) for name in names} else "else"


def _objects_hit(box: tuple[int, ...] | None, question: Any) -> list[bool]:
    """[IoU >= 0.5 with the referred box, with any object's box, the scene has one object, the object whose centre is
    nearest the box's is the referred one] for one referring expression (a missing box hits nothing)."""
    width, height = question.image.size
    boxes = [normalise_box(o.box, width, height) for o in question.objects]
    if box is None:
        return [False, False, len(boxes) == 1, False]
    nearest = min(boxes, key=lambda other: math.dist(_centre(other), _centre(box)))
    hits_any = max(box_iou(box, other) for other in boxes) >= 0.5
    return [box_iou(box, question.box) >= 0.5, hits_any, len(boxes) == 1, tuple(nearest) == tuple(question.box)]


def _centre(box: tuple[int, ...]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _box_error(box: tuple[int, ...], truth: tuple[int, ...]) -> list[float]:
    """|dx|, |dy| of the box centres and |dw|, |dh| of the sizes of two (x1, y1, x2, y2) boxes."""
    (x, y), (true_x, true_y) = _centre(box), _centre(truth)
    return [abs(x - true_x), abs(y - true_y), abs((box[2] - box[0]) - (truth[2] - truth[0])),
            abs((box[3] - box[1]) - (truth[3] - truth[1]))]  # fmt: skip


if __name__ == "__main__":
    main()
