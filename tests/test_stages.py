"""Staged recipes: stages run in order with their own rules, a finished stage is not re-run, and a run interrupted in
the middle of stage k resumes there and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from run_utils import TINY_DUAL_ENCODER, interrupt_after
from vlkit import from_pretrained
from vlkit.cpuinfo import describe_machine
from vlkit.recipes import InitFrom, Stage, get_recipe
from vlkit.recipes.base import describe_changes, lock_rules, recipe_from_dict
from vlkit.recipes.run import run_recipe, stage_dir
from vlkit.tasks.base import RunContext

TINY = {**TINY_DUAL_ENCODER, "train.batch_size": 8, "train.eval_every": None, "train.precision": "fp32",
        "train.save_every": 1, "data.train_size": 24, "data.eval_size": 8}  # fmt: skip


def two_stage_recipe():
    base = get_recipe("clip_shapes").with_overrides(TINY)
    train = dataclasses.replace(base.stages[0].train, steps=3, warmup_steps=1)
    stages = (Stage(train, name="locked", rules=lock_rules("image")), Stage(train, name="both"))
    return dataclasses.replace(base, name="clip_two_stages", stages=stages)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stages") / "run"
    run_recipe(two_stage_recipe(), out, progress=False, report=False)
    return out


def test_stages_run_in_order_with_their_own_rules(finished: Path, tmp_path: Path) -> None:
    recipe = two_stage_recipe()
    first, second = (stage_dir(finished, recipe, stage) for stage in recipe.stages)
    assert first.name == "0-locked" and second.name == "1-both"
    metrics = json.loads((finished / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"locked", "both"} and metrics["steps"] == 6
    assert metrics["zero_shot_top1"] == metrics["stages"]["both"]["zero_shot_top1"]
    # Every stage records the machine it trained on (its times and the precision "auto" picked hold there).
    assert {stage["machine"] for stage in metrics["stages"].values()} == {metrics["machine"], describe_machine("cpu")}
    assert recipe_from_dict(json.loads((finished / "recipe.json").read_text())) == recipe
    # Stage "locked" froze the image tower: its weights equal the freshly built model's; stage "both" moved them.
    initial = recipe.task.build_model(RunContext(recipe, finished, progress=False)).image_encoder.state_dict()
    after_first = from_pretrained(first / "model").image_encoder.state_dict()
    after_second = from_pretrained(finished / "model").image_encoder.state_dict()
    assert all(torch.equal(initial[name], after_first[name]) for name in initial)
    assert not all(torch.equal(after_first[name], after_second[name]) for name in initial)
    text_initial = recipe.task.build_model(RunContext(recipe, finished, progress=False)).text_encoder.state_dict()
    text_first = from_pretrained(first / "model").text_encoder.state_dict()
    assert not all(torch.equal(text_initial[name], text_first[name]) for name in text_initial)


def test_resume_skips_finished_stages_and_continues_the_interrupted_one(finished: Path, tmp_path: Path) -> None:
    recipe = two_stage_recipe()
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    first, second = (stage_dir(out, recipe, stage) for stage in recipe.stages)
    interrupt_after(out, second, step=1)  # stage "both"
    first_log = (first / "log.jsonl").read_text()
    run_recipe(recipe, out, progress=False, report=False, resume=True)
    assert (first / "log.jsonl").read_text() == first_log  # stage "locked" was not trained again
    log = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if "loss" in record] == [1, 2, 3]
    resumed, uninterrupted = (
        from_pretrained(out / "model").state_dict(),
        from_pretrained(finished / "model").state_dict(),
    )
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert json.loads((out / "metrics.json").read_text())["stages"].keys() == {"locked", "both"}


def test_an_old_run_folder_cannot_be_resumed_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="earlier vlkit"):
        run_recipe(two_stage_recipe(), tmp_path / "old", progress=False, report=False, resume=True)


def test_overrides_address_every_stage_or_one() -> None:
    recipe = two_stage_recipe()
    both = recipe.with_overrides({"train.lr": 0.5})
    assert [stage.train.lr for stage in both.stages] == [0.5, 0.5]
    one = recipe.with_overrides({"stages.both.train.lr": 0.25, "stages.0.train.steps": 6})
    assert [stage.train.lr for stage in one.stages] == [recipe.stages[0].train.lr, 0.25]
    assert [stage.train.steps for stage in one.stages] == [6, 3] and one.stages[0].train.warmup_steps == 2
    assert recipe.with_overrides({"lock": "none"}).stages[0].rules == ()
    with pytest.raises(KeyError, match="no stage"):
        recipe.with_overrides({"stages.missing.train.lr": 0.1})
    # A stage that reads the recipe's data has none of its own to change a field of: said, not a TypeError.
    assert recipe.stages[0].data is None
    with pytest.raises(KeyError, match=r"Stage.data is None, not a config: data.train_size cannot be set in it"):
        recipe.with_overrides({"stages.0.data.train_size": 8})


def test_describe_changes_names_each_changed_setting_and_a_scaled_warmup() -> None:
    recipe = two_stage_recipe()
    overrides = {"stages.both.train.steps": 9, "model.vision.depth": 3}
    lines = describe_changes(recipe, recipe.with_overrides(overrides), given=overrides)
    assert lines == [
        f"model.vision.depth: {recipe.model_overrides['vision.depth']} -> 3",
        "stages.both.train.steps: 3 -> 9",
        "stages.both.train.warmup_steps: 1 -> 3 (scaled with train.steps; give train.warmup_steps to choose it)",
    ]
    overrides = {"train.steps": 9, "train.warmup_steps": 2}
    assert describe_changes(recipe, recipe.with_overrides(overrides), given=overrides) == [
        f"stages.{name}.train.{key}" for name in ("locked", "both") for key in ("steps: 3 -> 9", "warmup_steps: 1 -> 2")
    ]
    assert describe_changes(recipe, recipe) == []


def test_a_stage_can_skip_its_evaluation(tmp_path: Path) -> None:
    recipe = two_stage_recipe()
    first, second = recipe.stages
    recipe = dataclasses.replace(recipe, stages=(dataclasses.replace(first, evaluate=False), second))
    run_recipe(recipe, tmp_path / "run", progress=False, report=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "zero_shot_top1" not in metrics["stages"]["locked"] and "zero_shot_top1" in metrics["stages"]["both"]
    assert recipe_from_dict(json.loads((tmp_path / "run" / "recipe.json").read_text())).stages[0].evaluate is False


def test_a_recipe_source_trains_on_the_runs_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``recipe:NAME`` is pretrained with the run's device (a GPU run must not train its tower on the CPU)."""
    import vlkit.recipes.run as run_module
    from vlkit.recipes.parts import resolve_source

    calls = []
    monkeypatch.setattr(run_module, "run_recipe", lambda recipe, out_dir, **options: calls.append(options))
    run = RunContext(get_recipe("llava_shapes"), tmp_path, progress=False, device="meta")
    resolve_source(InitFrom("recipe:siglip_patch_shapes"), run)
    assert [options["device"] for options in calls] == ["meta"]
