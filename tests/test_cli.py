"""End-to-end checks of the ``vlkit`` command: the output contract, bad input, resume, eval and data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlkit

TINY = [
    "--set", "data.train_size=48", "data.eval_size=16", "train.precision=fp32", "train.batch_size=16",
    "train.eval_every=null",
    "model.vision.depth=1", "model.text.depth=1", "model.vision.dim=32", "model.vision.num_heads=2",
    "model.vision.mlp_dim=64", "model.text.dim=32", "model.text.num_heads=2", "model.text.mlp_dim=64",
    "model.embed_dim=16",
]  # fmt: skip

# Where a one-stage recipe's trainer writes its log, checkpoints and TensorBoard files.
STAGE = "stages/0-train"


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, timeout=300, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"vlkit {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "siglip"
    result = run_cli("train", "--recipe", "siglip_shapes", "--out", str(out), "--steps", "4", "--save-every", "2",
                     "--quiet", *TINY)  # fmt: skip
    (out.parent / "stderr.txt").write_text(result.stderr)
    return out


def test_train_prints_what_the_overrides_resolved_to(trained_run: Path) -> None:
    stderr = (trained_run.parent / "stderr.txt").read_text()
    # --steps 4 scales the recipe's warmup with it, and says so; --set lines name the setting as given.
    assert re.search(r"recipe siglip_shapes: stages\.train\.train\.steps: \d+ -> 4\n", stderr), stderr
    assert re.search(r"stages\.train\.train\.warmup_steps: \d+ -> 0 \(scaled with train\.steps", stderr), stderr
    assert "model.vision.depth: (unset) -> 1" in stderr and "data.train_size: " in stderr


def test_train_writes_the_output_contract(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("zero_shot_top1", "zero_shot_top1_heldout", "retrieval_i2t_r1", "retrieval_t2i_r1", "train_seconds"):
        assert isinstance(metrics[key], float), key
    log = [json.loads(line) for line in (trained_run / STAGE / "log.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in log if "loss" in record]
    assert steps == [1, 2, 3, 4]
    assert all({"step", "loss", "lr"} <= set(record) for record in log if "loss" in record)
    report = (trained_run / "report.html").read_text()
    assert "confusion_zero_shot.png" in report and (trained_run / "confusion_zero_shot.png").exists()
    assert (trained_run / "retrieval.png").exists() and (trained_run / "loss.png").exists()
    assert any((trained_run / STAGE / "tensorboard").iterdir())
    assert (trained_run / STAGE / "checkpoints" / "latest").exists()
    assert json.loads((trained_run / STAGE / "metrics.json").read_text())["steps"] == 4


def test_saved_model_loads_and_reproduces_metrics(trained_run: Path, tmp_path: Path) -> None:
    model = vlkit.from_pretrained(trained_run / "model")
    assert model.tokenizer is not None
    assert model.config.vision.dim == 32 and model.config.loss == "siglip"
    out = trained_run / "eval.json"
    run_cli("eval", "--model", str(trained_run / "model"), "--size", "16", "--out", str(out))
    metrics = json.loads((trained_run / "metrics.json").read_text())
    evaluated = json.loads(out.read_text())
    # Trained and evaluated in fp32 (TINY): the saved model gives the trainer's numbers exactly.
    for key in ("zero_shot_top1", "zero_shot_top1_heldout", "zero_shot_top5"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-9), key
    # --split val: the validation splits (seen and held-out combinations), the same keys, other images.
    run_cli("eval", "--model", str(trained_run / "model"), "--split", "val", "--out", str(out))
    validated = json.loads(out.read_text())
    assert set(validated) == set(evaluated) and validated != evaluated
    # A run that compared on the validation split (--set data.eval_split=val) still evaluates on the test split by
    # default: --split, not the recorded choice, decides.
    compared = tmp_path / "compared_on_val"  # a copy: the module's run stays as trained
    shutil.copytree(trained_run / "model", compared)
    recipe = json.loads((compared / "recipe.json").read_text())
    recipe["data"]["eval_split"] = "val"
    (compared / "recipe.json").write_text(json.dumps(recipe))
    for split, expected in (("test", evaluated), ("val", validated)):
        run_cli("eval", "--model", str(compared), "--size", "16", "--split", split, "--out", str(out))
        assert json.loads(out.read_text()) == expected, split
    # --size sets the recorded run's data.eval_size: the same numbers as a run recorded with that size.
    recipe["data"]["eval_size"] = 5
    (compared / "recipe.json").write_text(json.dumps(recipe))
    run_cli("eval", "--model", str(compared), "--out", str(out))
    five = json.loads(out.read_text())
    assert five != evaluated  # 5 scenes per split read otherwise than 16: the comparison below can fail
    run_cli("eval", "--model", str(trained_run / "model"), "--size", "5", "--out", str(out))
    assert json.loads(out.read_text()) == five


def test_resume_of_a_finished_run_is_a_no_op(trained_run: Path) -> None:
    before = (trained_run / STAGE / "log.jsonl").read_text()
    run_cli("train", "--recipe", "siglip_shapes", "--out", str(trained_run), "--steps", "4", "--save-every", "2",
            "--resume", "--quiet", *TINY)  # fmt: skip
    assert (trained_run / STAGE / "log.jsonl").read_text().count('"loss"') == before.count('"loss"')


def test_train_into_a_used_folder_without_resume_is_a_clear_error(trained_run: Path) -> None:
    result = run_cli("train", "--recipe", "siglip_shapes", "--out", str(trained_run), "--steps", "4", "--quiet",
                     *TINY, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "resume" in result.stderr


def _manifest_with_a_bad_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(40):
        colour = ("red", "green", "blue", "white")[index % 4]
        Image.new("RGB", (40, 30), colour).save(folder / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "caption": f"a {colour} picture"}))
    (folder / "broken.png").write_bytes(b"not a png at all")
    lines.insert(7, json.dumps({"image": "broken.png", "caption": "a broken picture"}))
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_bad_training_image_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    manifest = _manifest_with_a_bad_image(tmp_path / "data")
    result = run_cli("train", "--recipe", "clip_shapes", "--out", str(tmp_path / "run"), "--steps", "3",
                     "--train-data", str(manifest), "--quiet", *TINY, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("vlkit: error:")]
    assert len(error_lines) == 1 and "train.jsonl:8" in error_lines[0] and "broken.png" in error_lines[0]


def test_skip_bad_counts_the_skip_in_log_and_report(tmp_path: Path) -> None:
    """A bad image is counted when a step draws it; the manifest's malformed lines, skipped as it is read, are counted
    from the first step on."""
    manifest = _manifest_with_a_bad_image(tmp_path / "data")
    with manifest.open("a") as stream:
        stream.write('{"image": "0.png", "caption": \n{"image": 3}\n')
    out = tmp_path / "run"
    run_cli("train", "--recipe", "clip_shapes", "--out", str(out), "--steps", "3", "--train-data", str(manifest),
            "--skip-bad", "--quiet", *TINY)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "stages" / "0-train" / "log.jsonl").read_text().splitlines()]
    first_step = next(record for record in log if "skipped" in record)
    assert first_step["skipped"] >= 2 and metrics["skipped"] >= 2
    assert "skipped" in (out / "report.html").read_text()


def test_data_shapes_command_writes_manifests(tmp_path: Path) -> None:
    run_cli("data", "shapes", "--out", str(tmp_path), "--train", "5", "--val", "2", "--test", "2",
            "--test-heldout", "2", "--quiet")  # fmt: skip
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 5 and (tmp_path / json.loads(lines[0])["image"]).exists()


def test_unknown_names_are_clear_errors(tmp_path: Path) -> None:
    result = run_cli("train", "--recipe", "no_such_recipe", "--out", str(tmp_path), check=False)
    assert result.returncode == 2 and "unknown recipe" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("eval", "--model", str(tmp_path / "missing"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_digits_recipe_runs_zero_shot_on_scanned_digits(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    tiny = [arg for arg in TINY if not arg.startswith(("data.train_size", "data.eval_size"))]
    run_cli("train", "--recipe", "clip_digits", "--out", str(out), "--steps", "2", "--quiet", *tiny)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["zero_shot_top1"] <= 1.0 and metrics["recipe"] == "clip_digits"


def test_train_streams_webdataset_shards_and_resumes(tmp_path: Path) -> None:
    import webdataset

    for shard in range(2):
        with webdataset.TarWriter(str(tmp_path / f"shard-{shard:03d}.tar")) as writer:
            for index in range(24):
                colour = ("red", "green", "blue")[index % 3]
                image = tmp_path / "tmp.png"
                Image.new("RGB", (36, 36), colour).save(image)
                writer.write({"__key__": f"{shard}-{index}", "png": image.read_bytes(), "txt": f"a {colour} square"})
    urls = str(tmp_path / "shard-{000..001}.tar")
    out = tmp_path / "run"
    args = ["train", "--recipe", "clip_shapes", "--out", str(out), "--train-data", urls, "--quiet", *TINY]
    run_cli(*args, "--steps", "4", "--save-every", "2")
    log = [json.loads(line) for line in (out / STAGE / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if "loss" in record] == [1, 2, 3, 4]
    # 48 samples / 16 per batch = 3 batches per epoch: step 4 starts the second pass over the shards.
    assert [record["epoch"] for record in log if "loss" in record] == [0, 0, 0, 1]
    # Rewind to the step-2 checkpoint and resume: the stream is replayed to the saved position, so steps 3 and 4
    # see the same batches and log the same losses as the first time.
    losses = [record["loss"] for record in log if "loss" in record]
    (out / STAGE / "checkpoints" / "latest").write_text("step_00000002")
    run_cli(*args, "--steps", "4", "--save-every", "2", "--resume")
    resumed = [json.loads(line) for line in (out / STAGE / "log.jsonl").read_text().splitlines()]
    assert [record["loss"] for record in resumed if "loss" in record] == losses


def test_fine_tune_a_hugging_face_clip_with_the_image_tower_locked(tmp_path: Path) -> None:
    import transformers

    from test_convert import _clip_tokenizer

    tokenizer = _clip_tokenizer(max_len=32)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    manifest = _manifest_with_a_bad_image(tmp_path / "data")
    out = tmp_path / "run"
    run_cli("train", "--recipe", "clip_shapes", "--out", str(out), "--init", str(tmp_path / "hf"), "--lock", "image",
            "--train-data", str(manifest), "--skip-bad", "--steps", "2", "--quiet",
            "--set", "train.batch_size=8", "data.eval_size=8", "train.eval_every=null")  # fmt: skip
    before, after = vlkit.from_pretrained(tmp_path / "hf"), vlkit.from_pretrained(out / "model")
    assert after.tokenizer is not None and after.tokenizer.eos_token_id == tokenizer.eos_token_id
    image_before, image_after = before.image_encoder.state_dict(), after.image_encoder.state_dict()
    assert all(torch.equal(image_before[name], image_after[name]) for name in image_before)
    text_before, text_after = before.text_encoder.state_dict(), after.text_encoder.state_dict()
    assert not all(torch.equal(text_before[name], text_after[name]) for name in text_before)


@pytest.mark.parametrize(
    ("cuda", "amx", "tower", "instruct"),
    [
        (
            False,
            False,
            {"steps": 1600, "warmup_steps": 225},
            {"steps": 1200, "schedule": "wsd", "attention_products": True},
        ),
        (False, True, {}, {"steps": 1500, "schedule": "wsd"}),
        (True, False, {}, {"steps": 1500, "schedule": "wsd"}),
    ],
)
def test_demo_budgets_follow_the_machine_kind(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, amx: bool, tower: dict, instruct: dict
) -> None:
    import vlkit.cpuinfo
    from vlkit.cli import DEMO_BUDGETS, DEMO_VLM_RECIPE, demo_budget
    from vlkit.recipes import get_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(vlkit.cpuinfo, "amx_tiles", lambda: amx)
    assert demo_budget() == {"tower": tower, "instruct": instruct}
    # The VLM's budgets are below its recipe's own, which the demo's 15 minutes cannot hold everywhere, and each is a
    # valid override of the recipe's instruct stage.
    recipe = get_recipe(DEMO_VLM_RECIPE)
    assert max(budget["instruct"]["steps"] for budget in DEMO_BUDGETS.values()) < recipe.stages[-1].train.steps
    overridden = recipe.with_overrides({f"stages.instruct.train.{key}": value for key, value in instruct.items()})
    assert overridden.stages[-1].train.steps == instruct["steps"]
    assert overridden.stages[-1].train.schedule == instruct.get("schedule", "cosine")
    assert overridden.stages[-1].train.attention_products == instruct.get("attention_products", False)
    # The tower: its recipe's own budget on matrix units, fewer steps (the recipe's warmup) elsewhere.
    siglip = get_recipe("siglip_patch_shapes")
    trained = siglip.with_overrides({f"train.{key}": value for key, value in tower.items()}).stages[-1].train
    assert (trained.steps, trained.warmup_steps) == (
        tower.get("steps", siglip.stages[-1].train.steps),
        siglip.stages[-1].train.warmup_steps,
    )
    assert trained.steps <= siglip.stages[-1].train.steps


def test_set_values_are_read_as_python_or_json_and_checked_against_their_field() -> None:
    from vlkit.cli import _parse_value
    from vlkit.recipes import get_recipe

    assert [_parse_value(text) for text in ("False", "true", "None", "null", ".001", "1e-3", "12", "[1, 2]")] == [
        False, True, None, None, 0.001, 0.001, 12, [1, 2]
    ]  # fmt: skip
    assert [_parse_value(text) for text in ("adamw", "nan", "inf")] == ["adamw", "nan", "inf"]
    recipe = get_recipe("siglip_shapes")
    assert recipe.with_overrides({"train.attention_products": False}).stages[0].train.attention_products is False
    assert recipe.with_overrides({"train.lr": 1}).stages[0].train.lr == 1
    for key, value in [("train.attention_products", "Flase"), ("train.eval_every", "never"), ("train.lr", "fast"),
                       ("train.precision", "fp16")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            recipe.with_overrides({key: value})
    with pytest.raises(ValueError, match=re.escape("'vision.depth': ViTConfig.depth takes int, got 2.5")):
        vlkit.get_config("shapes_siglip", {"vision.depth": 2.5})


def test_a_bad_set_value_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlkit.cli import main

    assert main(["train", "--recipe", "siglip_shapes", "--out", str(tmp_path), "--set", "train.eval_every=never"]) == 2
    assert "train.eval_every" in capsys.readouterr().err and not (tmp_path / "recipe.json").exists()


def test_set_given_twice_keeps_both_and_a_stage_setting_wins_over_every_stage() -> None:
    from vlkit.cli import build_parser
    from vlkit.recipes import get_recipe

    args = build_parser().parse_args(["train", "--recipe", "r", "--out", "o", "--set", "a=1", "--set", "b=2", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    recipe = get_recipe("llava_shapes")
    for overrides in ({"stages.instruct.train.lr": 1e-4, "train.lr": 5e-4},
                      {"train.lr": 5e-4, "stages.instruct.train.lr": 1e-4}):  # fmt: skip
        changed = recipe.with_overrides(overrides)
        assert [stage.train.lr for stage in changed.stages] == [5e-4, 5e-4, 1e-4]


def test_eval_of_a_directory_that_holds_no_dual_encoder_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlkit.cli import main

    vlkit.create_model("test_llava").save_pretrained(tmp_path / "vlm")
    assert main(["eval", "--model", str(tmp_path / "vlm"), "--size", "4"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "VisionLanguageModel" in error and "vlkit chat" in error
