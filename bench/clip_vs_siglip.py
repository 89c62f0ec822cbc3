"""Softmax (CLIP) vs sigmoid (SigLIP) loss on ShapesWorld at the same model, data, batch and budget.

Runs the ``clip_shapes`` and ``siglip_shapes`` recipes one after the other and writes their final metrics to
``--out`` (JSON) plus a small table on stdout. The SigLIP paper (Zhai et al., 2023) finds the sigmoid loss at
least as good as softmax at small batch sizes; this measures that claim on ShapesWorld.

    python bench/clip_vs_siglip.py --out bench/results/clip_vs_siglip.json [--steps N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from vlkit.recipes import get_recipe
from vlkit.recipes.run import run_recipe

KEYS = ("zero_shot_top1", "zero_shot_top1_heldout", "retrieval_i2t_r1", "retrieval_t2i_r1", "train_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the recipes' own budget)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--work-dir", help="keep the runs here instead of a temporary folder")
    args = parser.parse_args()

    overrides: dict[str, object] = {}
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.batch_size is not None:
        overrides["train.batch_size"] = args.batch_size
    results: dict[str, object] = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                              "processor": platform.processor() or platform.machine()}}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        for name in ("clip_shapes", "siglip_shapes"):
            recipe = get_recipe(name).with_overrides(overrides)
            metrics = run_recipe(recipe, work / name, resume=True).metrics
            results[name] = {key: metrics[key] for key in KEYS} | {
                "steps": recipe.train.steps,
                "batch_size": recipe.train.batch_size,
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'recipe':16s}" + "".join(f"{key:>24s}" for key in KEYS))
    for name in ("clip_shapes", "siglip_shapes"):
        row = results[name]
        assert isinstance(row, dict)
        print(f"{name:16s}" + "".join(f"{row[key]:24.3f}" for key in KEYS))


if __name__ == "__main__":
    main()
