"""The data path of the demo's two longest stages: milliseconds of data preparation per batch, the in-memory caches
on and off, on the samples' first visit and on a later epoch's.

- ``tower``: ``siglip_patch_shapes``' ``ImageTextDataset`` (ShapesWorld's 64-pixel PNGs and their captions, batch
  64). Off: every item decodes and resizes its PNG and encodes its caption; on: the resized pixels are kept
  (``cache_bytes``) and the tokenizer remembers what it encoded.
- ``instruct``: ``honeybee_d_shapes``' instruct stage, ``ShapesInstructionDataset`` (a scene rendered, its
  instruction items made, turns drawn, the conversation tokenized, batch 32). Off: every item makes its scene anew
  and tokenizes through the raw ``tokenizers`` backend; on: scenes are kept (``cache_scenes``) and the tokenizer
  remembers.

The trainer prepares batches in its own process (``num_workers`` 0: on two cores a loader worker takes a core from
the step; one made the tower's step 179 ms against 160 on the AMX Xeon), so these milliseconds add to every step.
Each row times the same ``--batches`` batches of a seeded shuffle twice: at epoch 0 (the first visit, which fills the
caches) and at epoch 1 (other captions and turns, the same images and scenes). The settings alternate off / on, fresh
datasets each time.

    python bench/data_path.py --out bench/results/data_path_amx.json [--batches 40 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train_step import cpu_description
from vlkit.data.readers import IMAGE_CACHE_BYTES, ImageTextDataset
from vlkit.recipes import get_recipe
from vlkit.tasks.base import RunContext, TrainingInputs
from vlkit.tasks.vlm_data import SCENE_CACHE, ShapesInstructionDataset


def time_batches(dataset: Any, collate: Callable[[list[Any]], Any], batches: list[list[int]]) -> dict[str, float]:
    """Milliseconds per batch (wall and process CPU) over ``batches`` at epoch 0, then again at epoch 1."""
    out = {}
    for epoch, name in ((0, "first_visit"), (1, "later_epoch")):
        dataset.set_epoch(epoch)
        wall, cpu = time.perf_counter(), time.process_time()
        for indices in batches:
            collate([dataset[index] for index in indices])
        out[f"{name}_ms"] = (time.perf_counter() - wall) * 1000 / len(batches)
        out[f"{name}_cpu_ms"] = (time.process_time() - cpu) * 1000 / len(batches)
    return out


def prepared(recipe_name: str, workdir: Path, quick: bool) -> tuple[RunContext, Any, Any, TrainingInputs]:
    """The recipe's run, its freshly built model, its last stage and that stage's training inputs."""
    recipe = get_recipe(recipe_name)
    if quick:
        recipe = recipe.with_overrides({"data.train_size": 300})
    run = RunContext(recipe, workdir / recipe_name, progress=False, report=False)
    model = recipe.task.build_model(run)
    stage = recipe.stages[-1]
    return run, model, stage, recipe.task.training_inputs(run, stage, model)


def tower(workdir: Path, quick: bool) -> tuple[Callable[[bool], Any], TrainingInputs]:
    _, model, _, inputs = prepared("siglip_patch_shapes", workdir, quick)
    base, tokenizer = inputs.dataset, model.tokenizer
    assert isinstance(base, ImageTextDataset) and tokenizer is not None

    def make(on: bool) -> ImageTextDataset:
        tokenize = tokenizer.encode if on else (lambda text: tokenizer.backend.encode(text).ids)
        return ImageTextDataset(base.records, base.transform, tokenize, base.max_text_len, seed=base.seed,
                                pad_id=base.pad_id, cache_bytes=IMAGE_CACHE_BYTES if on else 0)  # fmt: skip

    return make, inputs


def instruct(workdir: Path, quick: bool) -> tuple[Callable[[bool], Any], TrainingInputs]:
    run, model, stage, inputs = prepared("honeybee_d_shapes", workdir, quick)
    spec = run.training_data(stage)

    def make(on: bool) -> ShapesInstructionDataset:
        dataset = ShapesInstructionDataset(spec, model, stage.train.seed, cache_scenes=SCENE_CACHE if on else 0)
        if not on:
            dataset.tokenizer = model.tokenizer.backend  # the tokenizers library's, which remembers nothing
        return dataset

    return make, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="off / on pairs per dataset")
    parser.add_argument("--quick", action="store_true", help="300 scenes, 3 batches, one round: a smoke test")
    args = parser.parse_args()
    batches, rounds = (3, 1) if args.quick else (args.batches, args.rounds)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results: dict[str, Any] = {"machine": cpu_description(), "batches": batches, "rounds": rounds}
    with tempfile.TemporaryDirectory() as folder:
        for name, setup in (("tower", tower), ("instruct", instruct)):
            make, inputs = setup(Path(folder), args.quick)
            collate, batch_size = inputs.collate_fn, inputs.batch_size
            order = torch.randperm(len(make(False)), generator=torch.Generator().manual_seed(0)).tolist()
            chosen = [order[start : start + batch_size] for start in range(0, batches * batch_size, batch_size)]
            runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
            for _ in range(rounds):
                for setting in ("off", "on"):
                    runs[setting].append(time_batches(make(setting == "on"), collate, chosen))
            row: dict[str, Any] = {"batch_size": batch_size}
            for setting, measured in runs.items():
                row[setting] = {key: statistics.median(run[key] for run in measured) for key in measured[0]}
            row["later_epoch_speedup"] = row["off"]["later_epoch_ms"] / row["on"]["later_epoch_ms"]
            results[name] = row
            print(f"{name} (batch {batch_size}): off {row['off']['first_visit_ms']:.1f} / "
                  f"{row['off']['later_epoch_ms']:.1f} ms, on {row['on']['first_visit_ms']:.1f} / "
                  f"{row['on']['later_epoch_ms']:.1f} ms per batch (first visit / later epoch)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
