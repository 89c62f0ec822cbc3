"""Can a ShapesWorld VLM's language model answer from a description in its context?

The experiment log's (docs/experiments.md) "The language model cannot read yet" section: the questions of test scenes
are asked in the chat layout with the scene's caption where the image would stand (``described_conversations``:
caption, colour, shape, size, count and existence questions, which the caption answers; with ``--layout`` the scene's
layout, every object with its box, and every kind of question), and each answer is scored
teacher-forced (exact match of every answer token; ``DescribedTextEvaluation``, which also scores a recipe's stages on
described text). With ``--steps N`` the language model first trains N more steps on
the described conversations of the training scenes alone, and is probed every ``--every`` steps, to show how fast it
learns to read the description. The image tower and bridge are not used. Writes ``--out`` (JSON).

    python bench/vlm_text_probe.py --model RUN/stages/0-text/model --out probe.json [--steps 800 --lr 1e-3]
        [--save DIR] [--split val]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlkit.data.shapes import EVAL_SPLITS
from vlkit.data.specs import ShapesText
from vlkit.hub import from_pretrained
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes.contrastive import SHAPES_DATA
from vlkit.tasks.vlm import DescribedTextEvaluation, ShapesTextDataset, _collate, _step


def _spec(scenes: int, layout: bool, eval_size: int = 100, split: str = "test") -> ShapesText:
    return ShapesText(SHAPES_DATA, train_size=scenes, described=True, plain=False, layout=layout, eval_size=eval_size,
                      eval_split=split)  # fmt: skip


def probe(model: VisionLanguageModel, evaluation: DescribedTextEvaluation) -> dict[str, float]:
    """Teacher-forced exact-match accuracy per question kind (``text_accuracy_<kind>``, one-turn conversations)."""
    model.eval()
    metrics = evaluation(model).metrics
    model.train()
    return {key: round(value, 3) for key, value in metrics.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a ShapesWorld VLM model directory (e.g. a text stage's)")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps on described conversations")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every", type=int, default=100, help="probe every this many steps")
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--probe-scenes", type=int, default=100, help="scenes of --split asked about")
    parser.add_argument("--split", default="test", choices=EVAL_SPLITS, help="the split the probed scenes come from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", action="store_true",
                        help="describe each scene by its layout (every object with its box) rather than its caption, "
                        "and ask spatial and grounding questions too")  # fmt: skip
    parser.add_argument("--save", help="save the trained model here (a model directory, as --model)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = from_pretrained(args.model)
    if not isinstance(model, VisionLanguageModel) or model.tokenizer is None:
        raise SystemExit(f"error: {args.model} is not a VLM with a tokenizer")
    collate = _collate(model.tokenizer.pad_token_id)
    held_out = DescribedTextEvaluation.build(
        _spec(1, args.layout, args.probe_scenes, args.split), model, batch_size=128
    )
    results = [{"step": 0, "accuracy": probe(model, held_out)}]
    print(results[-1], flush=True)
    if args.steps:
        train = ShapesTextDataset(_spec(args.train_scenes, args.layout), model)
        trainable = [p for name, p in model.named_parameters() if name.startswith("lm.")]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.05)
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        for step in tqdm(range(1, args.steps + 1), desc="described text", unit="step"):
            batch = collate([train[int(k)] for k in rng.integers(len(train), size=args.batch_size)])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _step(model, batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.every == 0 or step == args.steps:
                seconds = round(time.perf_counter() - start, 1)
                results.append({"step": step, "loss": round(loss.item(), 4), "seconds": seconds,
                                "accuracy": probe(model, held_out)})  # fmt: skip
                tqdm.write(str(results[-1]))
    if args.save:
        model.save_pretrained(args.save)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    Path(args.out).write_text(json.dumps({"settings": settings, "probes": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
