"""Run a recipe: its stages in order, each with the one trainer and the task it names. No per-task branch here.

Outputs (the contract other parts rely on), for a recipe with stages ``s0, s1, ...``:

    out/recipe.json                   the recipe as trained
    out/stages/{i}-{name}/            each stage's log.jsonl, tensorboard/, checkpoints/, metrics.json, report.html
    out/stages/{i}-{name}/model       a finished stage's weights (all stages but the last)
    out/model                         the final model (loadable with ``vlkit.from_pretrained``)
    out/metrics.json                  the last stage's evaluation + train_seconds, steps, skipped, the machine it
                                      trained on, and per stage
    out/report.html

``resume`` skips finished stages (their weights are loaded) and continues the interrupted one from its newest intact
checkpoint. Under torchrun every rank calls ``run_recipe``: rank 0 renders data and fits tokenizers first, the
others then read its files; all ranks train and evaluate; only rank 0 writes outputs (an FSDP model is gathered to
rank 0 as one ordinary single-file vlkit model).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.cpuinfo import describe_machine
from vlkit.files import load_safetensors, read_json, write_json
from vlkit.models.base import build_model
from vlkit.recipes.base import Recipe, Stage
from vlkit.recipes.parts import init_parts
from vlkit.tasks.base import RunContext, Task
from vlkit.train import Trainer, TrainResult, distributed, write_report
from vlkit.train.distributed import Strategy

__all__ = ["RunResult", "logged_mean", "run_recipe", "stage_dir"]


@dataclass
class RunResult:
    """``model`` is the trained plain model on rank 0; on other ranks of an FSDP run it is their sharded module."""

    metrics: dict[str, Any]
    out_dir: Path
    model: nn.Module


def stage_dir(out_dir: Path, recipe: Recipe, stage: Stage) -> Path:
    return Path(out_dir) / "stages" / f"{recipe.stages.index(stage)}-{stage.name}"


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    train_data: str | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    init: str | None = None,
    progress: bool = True,
    strategy: Strategy = "ddp",
    device: torch.device | str = "cpu",
    report: bool = True,
) -> RunResult:
    """Train ``recipe`` into ``out_dir`` (see the module doc); ``report=False`` skips the HTML reports and figures."""
    main = distributed.is_main_process()
    run = RunContext(recipe, Path(out_dir), train_data, skip_bad, init, progress and main, strategy, device, report)
    if strategy == "fsdp" and len(recipe.stages) > 1 and distributed.get_world_size() > 1:
        raise ValueError(f"recipe {recipe.name}: FSDP runs one-stage recipes; train its stages with --strategy ddp")
    _check_run_folder(run, resume)
    if main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.out_dir / "recipe.json", recipe.to_dict())
    with distributed.main_process_first():
        model = recipe.task.build_model(run)
    stages: dict[str, dict[str, Any]] = {}
    for stage in recipe.stages:
        last = stage is recipe.stages[-1]
        folder = stage_dir(run.out_dir, recipe, stage)
        weights = (run.out_dir if last else folder) / "model"
        if resume and (folder / "metrics.json").exists() and (weights / "model.safetensors").exists():
            model.load_state_dict(load_safetensors(weights / "model.safetensors"))
            stages[stage.name] = read_json(folder / "metrics.json")
            continue
        model, stages[stage.name] = _train_stage(run, stage, stage.task or recipe.task, model, folder, resume)
        if main:
            model.save_pretrained(weights)
            # The model directory records what it was trained for, so `vlkit eval` / `vlkit chat` need no recipe.
            write_json(weights / "recipe.json", recipe.to_dict())
            write_json(folder / "metrics.json", stages[stage.name])
    final = stages[recipe.stages[-1].name]
    metrics = {**final, "train_seconds": sum(m["train_seconds"] for m in stages.values()),
               "steps": sum(m["steps"] for m in stages.values()), "recipe": recipe.name, "stages": stages}  # fmt: skip
    if main:
        if report and len(recipe.stages) > 1:
            last_folder = stage_dir(run.out_dir, recipe, recipe.stages[-1])
            write_report(run.out_dir, f"vlkit · {recipe.name}", metrics, last_folder / "log.jsonl",
                         _figures_of(last_folder), [recipe.description])  # fmt: skip
        elif report:
            _copy_report(stage_dir(run.out_dir, recipe, recipe.stages[0]), run.out_dir)
        write_json(run.out_dir / "metrics.json", metrics)
    # Nobody returns (and perhaps exits, tearing the process group down) before rank 0 has written the outputs.
    distributed.barrier()
    return RunResult(metrics, run.out_dir, model)


def _train_stage(
    run: RunContext, stage: Stage, task: Task, model: nn.Module, folder: Path, resume: bool
) -> tuple[nn.Module, dict[str, Any]]:
    main = distributed.is_main_process()
    init_parts(model, stage.init, run)
    model.requires_grad_(True)  # what an earlier stage froze trains again unless this stage's rules freeze it
    with distributed.main_process_first():
        inputs = task.training_inputs(run, stage, model)
    evaluate = task.evaluation(run, model, stage) if stage.evaluate else None
    progress = stage.train.progress and run.progress
    rules = stage.param_group_rules(model)
    config = dataclasses.replace(stage.train, param_groups=rules, batch_size=inputs.batch_size, progress=progress)
    trained = inputs.module if inputs.module is not None else model
    trainer = Trainer(trained, config, inputs.dataset, inputs.collate_fn, inputs.step_fn, folder, evaluate=evaluate,
                      device=run.device, sampler_factory=inputs.sampler_factory, strategy=run.strategy,
                      skipped=inputs.skipped)  # fmt: skip
    result = trainer.fit(resume=resume)
    metrics: dict[str, Any] = {**result.final_eval, "train_seconds": result.train_seconds, "steps": result.steps,
                               "skipped": result.skipped, "stage": stage.name,
                               "precision": result.precision, "compiled": result.compiled,
                               "machine": _machine(trainer.device)}  # fmt: skip
    padding = logged_mean(result.log_path, "padding_fraction") if main else None
    if padding is not None:
        metrics["padding_fraction"] = padding
    if distributed.is_sharded(trainer.model):
        # Every rank takes part in the gather; rank 0 rebuilds an ordinary model from the full weights.
        full_state = trainer.full_state_dict()
        if main:
            plain = build_model(model.config)
            plain.load_state_dict(full_state)
            plain.tokenizer = getattr(model, "tokenizer", None)
            model = plain
    if main and run.report:
        _stage_report(run, stage, task, result, metrics, folder)
    return model, metrics


def _stage_report(
    run: RunContext, stage: Stage, task: Task, result: TrainResult, metrics: dict[str, Any], folder: Path
) -> None:
    from vlkit.eval.result import EvalResult

    figures, notes = task.report(run, EvalResult(result.final_eval, result.final_artifacts), folder)
    title = f"vlkit · {run.recipe.name}" + (f" · stage {stage.name}" if len(run.recipe.stages) > 1 else "")
    write_report(folder, title, metrics, result.log_path, figures, [run.recipe.description, *notes])
    (folder / "figures.json").write_text(json.dumps([[caption, path.name] for caption, path in figures]))


def _figures_of(folder: Path) -> list[tuple[str, Path]]:
    listed = folder / "figures.json"
    return [(caption, folder / name) for caption, name in json.loads(listed.read_text())] if listed.exists() else []


def _copy_report(folder: Path, out_dir: Path) -> None:
    """A one-stage run's report is its stage's: copied up with its figures, so ``out/report.html`` stands alone."""
    import shutil

    for path in folder.iterdir():
        if path.suffix in (".html", ".png"):
            shutil.copy2(path, out_dir / path.name)


def _check_run_folder(run: RunContext, resume: bool) -> None:
    if resume and (run.out_dir / "checkpoints").is_dir() and not (run.out_dir / "stages").exists():
        raise ValueError(f"{run.out_dir} is a run folder of an earlier vlkit (checkpoints/ at the top, not per "
                         "stage) and cannot be resumed; its model/ still loads. Train into a new --out")  # fmt: skip


def _machine(device: torch.device) -> str:
    """``describe_machine``, with the number of processes where a run trains on several."""
    world = distributed.get_world_size()
    return describe_machine(device) + (f"; {world} processes" if world > 1 else "")


def logged_mean(log_path: Path, key: str) -> float | None:
    """The mean of ``key`` over the training steps of a run's ``log.jsonl``; ``None`` when no step logged it."""
    values = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if key in record:
            values.append(float(record[key]))
    return sum(values) / len(values) if values else None
