"""The wrong answers of a trained ShapesWorld VLM, per question kind, with the objects of each scene.

Asks the questions ``vlkit eval`` asks, built as it builds them from the model directory's ``recipe.json`` (one of
each kind per test scene; seen colour x shape combinations are listed), judges them by the VQA metric's own answer
normalisation, and writes every wrong answer as JSON lines
``{kind, question, answer, truth, objects: [[size, colour, shape], ...]}``, printing a count per kind and the first
``--show`` of each. The README's "Learning curves" reads binding errors off this list: a wrong colour answer that is
the other object's colour.

    python bench/vlm_errors.py --model RUN/model --out errors.jsonl [--show 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

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
    for question, answer in zip(evaluation.questions, answers, strict=True):
        vqa = question.split == "test" and question.kind not in NOT_VQA
        if vqa and normalise_answer(answer) != normalise_answer(question.answer):
            objects = [[o.size, o.colour, o.shape] for o in question.objects]
            wrong[question.kind].append({"kind": question.kind, "question": question.question, "answer": answer,
                                         "truth": question.answer, "objects": objects})  # fmt: skip
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for rows in wrong.values() for row in rows))
    for kind, rows in wrong.items():
        print(f"{kind}: {len(rows)} wrong")
        for row in rows[: args.show]:
            print(f"  {row['question']} -> {row['answer']} (true: {row['truth']}) {row['objects']}")


if __name__ == "__main__":
    main()
