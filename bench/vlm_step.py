"""The VLM training step as the task runs it, against the padded batch and against the LM head at every position.

Times the ``vlm`` task's training step (forward, loss, backward, fused AdamW) of a ShapesWorld VLM on batches of its
own instruct data, alternating in one process:

- ``step``: the task's step: the LM's blocks on the real tokens only (``DecoderLM.train_unpadded``) and the loss alone
  (``return_logits=False``: the head runs only at the positions that have a target, a fifth of an instruction sample);
- ``exact_rows``: ``step`` with its row counts not rounded up to ``ROW_MULTIPLE`` (``vlkit.lm.model``): a new
  shape for every product at every batch;
- ``padded``: the same with ``train_unpadded`` off, the right-padded batch as it is;
- ``head_everywhere``: the logits of every position and the loss from them (what ``model(..., labels)`` returns, as
  transformers computes it);
- ``tower_forward``: the frozen tower's forward alone, for scale.

Every timed step runs on a batch no step before it saw, as in training: oneDNN builds a kernel per product shape
(JIT-compiled for AMX tiles), which a bench repeating its batches would pay once and then find cached.
``--compile on`` (the default) compiles the LM's blocks as the trainer does for the instruct stages on a CPU
(``TrainConfig.compile="auto"``). Writes ``--out`` (JSON: medians, speed-ups and every step's seconds).

    python bench/vlm_step.py --model RUN/stages/1-align/model --out bench/results/vlm_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import train_step as ts
import vlkit.lm.model as lm_model
from vlkit.files import read_json
from vlkit.hub import from_pretrained
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes.base import Recipe, recipe_from_dict
from vlkit.tasks.vlm import ShapesInstructionDataset, _collate
from vlkit.train.compile import compile_for_training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a ShapesWorld VLM model directory a recipe run wrote")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, default=4, help="batches a round, each new, every variant on each")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", choices=("on", "off"), default="on", help="the LM's blocks, as the trainer does")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, recipe, batches = instruct_batches(args.model, args.batches * (args.rounds + 1))
    size = recipe.stages[-1].train.batch_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    if args.compile == "on":
        compile_for_training(model)
    row_multiple = lm_model.ROW_MULTIPLE

    def step(batch: dict[str, torch.Tensor], return_logits: bool, unpadded: bool = True, multiple: int = 0) -> None:
        model.lm.train_unpadded = unpadded
        lm_model.ROW_MULTIPLE = multiple or row_multiple
        train_step(model, optimizer, batch, autocast, return_logits)
        lm_model.ROW_MULTIPLE = row_multiple

    def tower(batch: dict[str, torch.Tensor]) -> None:
        with autocast, torch.no_grad():
            model.image_tokens(batch["pixel_values"])

    variants = {
        "step": lambda b: step(b, False),
        "exact_rows": lambda b: step(b, False, multiple=1),
        "padded": lambda b: step(b, False, unpadded=False),
        "head_everywhere": lambda b: step(b, True),
        "tower_forward": tower,
    }
    for batch in batches[: args.batches]:  # warm-up (and compilation)
        for run in variants.values():
            run(batch)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(1, args.rounds + 1):
        for batch in batches[round_ * args.batches : (round_ + 1) * args.batches]:
            for name, run in variants.items():
                start = time.perf_counter()
                run(batch)
                seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    lengths = [int(b["attention_mask"].sum(1).float().mean()) for b in batches]
    result = {
        **ts.cpu_description(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "model": args.model,
        "recipe": recipe.name,
        "precision": args.precision,
        "batch_size": size,
        "padded_lengths": [int(b["input_ids"].shape[1]) for b in batches],
        "mean_lengths": lengths,
        "real_fraction": float(sum(b["attention_mask"].float().mean() for b in batches) / len(batches)),
        "trained_fraction": float(sum((b["labels"] != -100).float().mean() for b in batches) / len(batches)),
        "median_s": medians,
        "compile": args.compile,
        "speedup": {
            "unpadded": medians["padded"] / medians["step"],
            "rows_rounded": medians["exact_rows"] / medians["step"],
            "head_at_targets": medians["head_everywhere"] / medians["step"],
        },
        "seconds": seconds,
    }
    write_result(args.out, result)


def instruct_batches(model_dir: str, count: int) -> tuple[VisionLanguageModel, Recipe, list[dict[str, torch.Tensor]]]:
    """The ShapesWorld VLM in ``model_dir`` in training mode with its tower frozen (the instruct stage's rule), its
    recipe, and ``count`` collated batches of the instruct stage's size from the recipe's instruction data."""
    model = from_pretrained(model_dir).train()
    if not isinstance(model, VisionLanguageModel):
        raise SystemExit(f"{model_dir} holds no vision-language model")
    recipe = recipe_from_dict(read_json(Path(model_dir) / "recipe.json"))
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    dataset = ShapesInstructionDataset(recipe.data, model, seed=0)
    collate = _collate(model.tokenizer.pad_token_id)
    size = recipe.stages[-1].train.batch_size
    return model, recipe, [collate([dataset[i] for i in range(b * size, (b + 1) * size)]) for b in range(count)]


def train_step(
    model: VisionLanguageModel,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    autocast: torch.autocast,
    return_logits: bool = False,
) -> None:
    """Forward with the loss (the head at the targets only unless ``return_logits``), backward, optimizer step."""
    with autocast:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                    return_logits=return_logits)  # fmt: skip
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def write_result(out: str, result: dict[str, Any]) -> None:
    """``result`` as JSON at ``out``; printed without its per-step ``seconds``."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
