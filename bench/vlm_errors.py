"""The wrong answers of a trained ShapesWorld VLM, per question kind, with the objects of each scene.

Asks the questions ``vlkit eval`` asks, built as it builds them from the model directory's ``recipe.json`` (one of
each kind per test scene; seen colour x shape combinations are listed), judges them by the VQA metric's own answer
normalisation, and writes every wrong answer as JSON lines
``{kind, question, answer, truth, objects: [[size, colour, shape], ...]}``, printing a count per kind and the first
``--show`` of each. The experiment log's (docs/experiments.md) "Learning curves" reads binding errors off this list: a
wrong colour answer that is the other object's colour.

Referring expressions are judged as the grounding metric judges them (IoU >= 0.5): a miss is written with both boxes,
and a line per split says where the parsed boxes err, as the median and mean distance of the box centre along x and
along y and of the width and height from the true box, in the [0, 1000) coordinates the model writes, and the
correlation of the predicted with the true centre along each axis. The README's
"The image tower, trained patch by patch" reads ``llava_shapes``' misplaced boxes off it (right size and row, wrong
column).

    python bench/vlm_errors.py --model RUN/model --out errors.jsonl [--show 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vlkit.eval.grounding import box_iou, parse_box
from vlkit.eval.vqa import normalise_answer
from vlkit.files import read_json
from vlkit.hub import from_pretrained
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes.base import recipe_from_dict
from vlkit.tasks.base import RunContext
from vlkit.tasks.vlm import VLMEvaluation

NOT_VQA = ("caption", "grounding")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a VLM model directory a recipe run wrote")
    parser.add_argument("--out", required=True, help="JSON lines of the wrong answers")
    parser.add_argument("--show", type=int, default=12, help="wrong answers printed per kind")
    args = parser.parse_args(argv)

    model = from_pretrained(args.model).eval()
    if not isinstance(model, VisionLanguageModel):
        parser.error(f"{args.model} holds no vision-language model")
    recipe = recipe_from_dict(read_json(Path(args.model) / "recipe.json"))
    with tempfile.TemporaryDirectory() as scratch:
        evaluation = recipe.task.evaluation(RunContext(recipe, Path(scratch), progress=False), model)
    if not isinstance(evaluation, VLMEvaluation):
        parser.error(f"{args.model}: recipe {recipe.name} does not evaluate by asking questions")
    with torch.no_grad():
        answers = evaluation.answer(model)
    wrong: dict[str, list[dict[str, object]]] = defaultdict(list)
    box_errors: dict[str, list[list[float]]] = defaultdict(list)  # split -> [|dx|, |dy|, |dw|, |dh|] per parsed box
    centres: dict[str, list[list[float]]] = defaultdict(list)  # split -> [x, y, true x, true y] per parsed box
    for question, answer in zip(evaluation.questions, answers, strict=True):
        if question.kind == "grounding" and question.box is not None:
            box = parse_box(answer)
            if box is not None:
                box_errors[question.split].append(_box_error(box, question.box))
                centres[question.split].append([*_centre(box), *_centre(question.box)])
            if question.split == "test" and (box is None or box_iou(box, question.box) < 0.5):
                predicted = None if box is None else list(box)
                wrong["grounding"].append({"kind": "grounding", "question": question.question, "answer": answer,
                                           "truth": list(question.box), "box": predicted})  # fmt: skip
        vqa = question.split == "test" and question.kind not in NOT_VQA
        if vqa and normalise_answer(answer) != normalise_answer(question.answer):
            objects = [[o.size, o.colour, o.shape] for o in question.objects]
            wrong[question.kind].append({"kind": question.kind, "question": question.question, "answer": answer,
                                         "truth": question.answer, "objects": objects})  # fmt: skip
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for rows in wrong.values() for row in rows))
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


def _centre(box: tuple[int, ...]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _box_error(box: tuple[int, ...], truth: tuple[int, ...]) -> list[float]:
    """|dx|, |dy| of the box centres and |dw|, |dh| of the sizes of two (x1, y1, x2, y2) boxes."""
    (x, y), (true_x, true_y) = _centre(box), _centre(truth)
    return [abs(x - true_x), abs(y - true_y), abs((box[2] - box[0]) - (truth[2] - truth[0])),
            abs((box[3] - box[1]) - (truth[3] - truth[1]))]  # fmt: skip


if __name__ == "__main__":
    main()
