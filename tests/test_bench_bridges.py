"""``vlkit bench bridges``: every bridge on one shared tower and LM, its table, and the two VLM claims' rules."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import vlkit
from vlkit import cli
from vlkit.bench.bridges import (
    INSTRUCT_STEPS,
    ROWS,
    BridgesBench,
    blip2_result,
    bridges_table,
    frozen_lm_stage,
    honeybee_result,
    load_bridges,
    median_step_seconds,
)
from vlkit.bench.claims import QUICK, ClaimsBench, Scale, machines_line
from vlkit.cpuinfo import describe_machine
from vlkit.recipes import base, get_recipe


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bridges") / "bench"
    assert cli.main(["bench", "bridges", "--out", str(out), "--quick", "--quiet"]) == 0
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return vlkit.from_pretrained(path).state_dict()


def test_quick_bench_trains_every_row_on_the_shared_tower_and_lm(quick_bench: Path) -> None:
    runs = quick_bench / "runs"
    rows = load_bridges(quick_bench / "bridges.json")
    assert [row["run"] for row in rows] == [row.name for row in ROWS]
    assert sorted(path.name for path in runs.iterdir()) == sorted([*(row.name for row in ROWS), "llava_text",
                                                                   "vlm_siglip_patch_b4"])  # fmt: skip
    tower = _state(runs / "vlm_siglip_patch_b4" / "model")
    lm = _state(runs / "llava_text" / "model")
    tokenizer = (runs / "llava_text" / "tokenizer.json").read_bytes()
    for row, spec in zip(rows, ROWS, strict=True):
        run = runs / row["run"]
        model = vlkit.from_pretrained(run / "model")
        assert model.tokens_per_image() == row["tokens"] == spec.tokens and row["tokens"] in (16, 64)
        assert row["kind"] == model.config.bridge.kind and row["bridge"] == spec.label
        if not spec.stage1:
            assert row["bridge_parameters"] == sum(p.numel() for p in model.bridge.parameters())
        assert row["step_seconds"] > 0 and row["train_seconds"] > 0 and row["step_stage"] == "instruct"
        assert 0.0 <= row["vqa_accuracy"] <= 1.0 and 0.0 <= row["spatial_accuracy"] <= 1.0
        assert (run / "tokenizer.json").read_bytes() == tokenizer
        final = model.state_dict()
        # The frozen tower is the shared run's; the LM starts from the shared text stage (frozen in align).
        for name, tensor in tower.items():
            if name.startswith("image_encoder."):
                assert torch.equal(final[name.replace("image_encoder.", "encoder.", 1)], tensor), (row["run"], name)
        stages = sorted(path.name for path in (run / "stages").iterdir())
        assert stages == (["0-qformer", "1-align", "2-instruct"] if spec.stage1 else ["0-align", "1-instruct"])
        aligned = _state(run / "stages" / stages[-2] / "model")
        assert all(torch.equal(aligned[name], tensor) for name, tensor in lm.items() if name.startswith("lm."))
    stage1, plain = (next(row for row in rows if row["run"] == name) for name in ("qformer_m16_stage1", "qformer_m16"))
    assert stage1["bridge_parameters"] == plain["bridge_parameters"]  # the text side only stage 1 reads is left out
    assert bridges_table(rows) in (quick_bench / "bridges.md").read_text()
    # The table names the machine every run it reads trained on (the shared tower and LM too).
    machines = json.loads((quick_bench / "bridges.json").read_text())["machines"]
    assert sorted(machines) == sorted(path.name for path in runs.iterdir())
    assert set(machines.values()) == {describe_machine("cpu")}
    assert f"Trained on: {describe_machine('cpu')}.\n" in (quick_bench / "bridges.md").read_text()


def test_quick_bench_resumes_refuses_changes_and_serves_the_claims(
    quick_bench: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = sorted(path.name for path in (quick_bench / "runs").iterdir())
    data = json.loads((quick_bench / "bridges.json").read_text())
    assert cli.main(["bench", "bridges", "--out", str(quick_bench), "--quick", "--quiet"]) == 0
    assert json.loads((quick_bench / "bridges.json").read_text()) == data
    # The two VLM claims read the same runs: nothing more is trained.
    only = ["honeybee_locality", "blip2_stage1"]
    assert cli.main(["bench", "claims", "--out", str(quick_bench), "--quick", "--quiet", "--only", *only]) == 0
    assert sorted(path.name for path in (quick_bench / "runs").iterdir()) == runs
    claims = {row["key"]: row for row in json.loads((quick_bench / "claims.json").read_text())["claims"]}
    assert list(claims) == only and claims["blip2_stage1"]["numbers"]["stage2_steps"] == 2.0
    machines = json.loads((quick_bench / "claims.json").read_text())["machines"]
    assert {"c_abstractor_m16", "resampler_m16", "qformer_m16", "qformer_m16_stage1"} <= set(machines)
    # Read again on the scale's claim_scenes test scenes per split (the runs' own evaluations ask fewer): the
    # BLIP-2 row on every kind after align, the Honeybee row on spatial questions after the last stage.
    assert claims["blip2_stage1"]["summary"].startswith(f"VQA (%) after align on {QUICK.claim_scenes} test scenes")
    assert f"on {QUICK.claim_scenes} test scenes per split" in claims["honeybee_locality"]["setting"]
    runs_dir, scenes, numbers = quick_bench / "runs", QUICK.claim_scenes, claims["honeybee_locality"]["numbers"]
    for bridge in ("c_abstractor", "resampler"):
        read = json.loads((runs_dir / f"{bridge}_m16" / f"eval-instruct-spatial-{scenes}.json").read_text())
        assert numbers[f"{bridge}_spatial"] == read["vqa_accuracy_spatial"] == read["vqa_accuracy"]
    read = json.loads((runs_dir / "qformer_m16" / f"eval-align-{scenes}.json").read_text())
    assert claims["blip2_stage1"]["numbers"]["vqa_no_stage1"] == read["vqa_accuracy"]
    # llava_shapes as the bench reads it when it runs: a changed recipe stops the bench at the row it changes.
    original = base._RECIPES["llava_shapes"]
    monkeypatch.setitem(base._RECIPES, "llava_shapes",
                        lambda: original().with_overrides({"stages.instruct.train.lr": 0.5}))  # fmt: skip
    with pytest.raises(ValueError, match="linear_m64 was trained with other settings"):
        BridgesBench(quick_bench, QUICK).run_row(ROWS[0])


def test_full_scale_rows_take_llava_shapes_stages_and_share_the_claims_tower(tmp_path: Path) -> None:
    bench = BridgesBench(tmp_path, Scale(steps=0.5))
    llava, blip2 = get_recipe("llava_shapes"), get_recipe("blip2_shapes")
    tower, lm = base.InitFrom(str(tmp_path / "tower"), part="image_encoder"), base.InitFrom(str(tmp_path / "lm"))
    for row in ROWS:
        recipe = bench.recipe(bench.row_recipe(row, tower, lm))
        expected = [stage for stage in llava.stages if stage.name != "text"]
        expected = [blip2.stage("qformer"), *expected] if row.stage1 else expected
        assert [stage.name for stage in recipe.stages] == [stage.name for stage in expected]
        for stage, source in zip(recipe.stages, expected, strict=True):
            # Every stage as llava_shapes trains it, but the instruct stage at the bench's own step count.
            steps = INSTRUCT_STEPS if stage.name == "instruct" else source.train.steps
            assert stage.train == dataclasses.replace(source.train, steps=round(steps * 0.5),
                                                      warmup_steps=stage.train.warmup_steps)  # fmt: skip
        assert recipe.stages[0].init == {"encoder": tower, "lm": lm} and recipe.model == row.preset
        # llava_shapes' data, but every kind drawn alike (the mix the bench's table was measured on).
        assert llava.data.kind_weights and recipe.data == dataclasses.replace(llava.data, kind_weights=())
    # At one scale for both benches the tower is the run the claims bench would train under that name.
    name, source, overrides, _ = bench.tower_run()
    batch = get_recipe("siglip_patch_shapes").stages[0].train.batch_size
    claims = ClaimsBench(tmp_path, Scale(steps=0.5)).recipe("siglip_patch_shapes", {"train.batch_size": batch})
    assert name == f"siglip_patch_b{batch}" and bench.recipe(source, overrides).to_dict() == claims.to_dict()


def test_claim_rules_on_synthetic_numbers() -> None:
    c, r = {"vqa_accuracy_spatial": 0.62, "vqa_accuracy": 0.7}, {"vqa_accuracy_spatial": 0.55, "vqa_accuracy": 0.7}
    holds = honeybee_result(c, r, 16)
    assert holds.reproduced and "62.0" in holds.summary and "55.0" in holds.summary and "+ 1.0 pt" in holds.rule
    assert not honeybee_result(r, c, 16).reproduced
    assert "on 1000 test scenes per split" in honeybee_result(c, r, 16, 1000).setting
    assert "on the runs' own test scenes" in holds.setting
    assert not honeybee_result({**c, "vqa_accuracy_spatial": 0.555}, r, 16).reproduced  # within the tolerance
    missing = honeybee_result({"vqa_accuracy": 0.7}, r, 16)
    assert not missing.reproduced and "n/a" in missing.summary
    with_stage1, without = {"vqa_accuracy": 0.40}, {"vqa_accuracy": 0.30}
    final = {"vqa_accuracy": 0.8}
    result = blip2_result(with_stage1, without, final, final, "align", 200)
    assert result.reproduced and result.numbers["stage2_steps"] == 200.0 and "after align" in result.rule
    assert not blip2_result(without, with_stage1, final, final, "align", 200).reproduced
    assert blip2_result(with_stage1, without, final, final, "align", 200, 1000).summary.startswith(
        "VQA (%) after align on 1000 test scenes: stage 1 + align 40.0 / align alone 30.0"
    )


def test_frozen_lm_stage_is_llava_shapes_align_stage() -> None:
    names = ["encoder.blocks.0.mlp.fc1.weight", "bridge.fc1.weight", "lm.token_embed.weight", "lm.blocks.0.w"]
    llava = get_recipe("llava_shapes")
    assert frozen_lm_stage(llava, names).name == "align"
    trained = dataclasses.replace(llava, stages=(llava.stage("instruct"),))
    with pytest.raises(ValueError, match="frozen LM"):
        frozen_lm_stage(trained, names)


def test_median_step_seconds_and_the_table(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    records = [{"step": 1, "samples_per_second": 10.0}, {"step": 1, "eval": {"vqa_accuracy": 0.5}},
               {"step": 2, "samples_per_second": 20.0}, {"step": 3, "samples_per_second": 5.0}]  # fmt: skip
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert median_step_seconds(log, 10) == pytest.approx(1.0)
    row = {"run": "qformer_m16", "bridge": "Q-Former", "tokens": 16, "bridge_parameters": 1_234_567,
           "step_stage": "instruct", "step_seconds": 0.4567, "vqa_accuracy": 0.8126, "spatial_accuracy": None,
           "count_accuracy": 0.5, "grounding_acc50": 0.25, "train_seconds": 321.4}  # fmt: skip
    table = bridges_table([row, {**row, "bridge": "resampler", "bridge_parameters": 5_960}])
    lines = table.splitlines()
    assert lines[0].startswith("| bridge | M | parameters | instruct s/step | VQA | spatial | count |")
    assert lines[2] == "| Q-Former | 16 | 1.23 M | 0.457 | 0.813 | n/a | 0.500 | 0.250 | 321 |"
    assert lines[3].startswith("| resampler | 16 | 6.0 k |") and len(lines) == 4


def test_the_machines_line_names_each_machine_once_and_the_runs_that_recorded_none() -> None:
    assert machines_line({"a": "Y", "b": "X", "c": "Y"}) == "Trained on: X; Y.\n"
    expected = "Trained on: X (not recorded for c: trained before vlkit recorded it).\n"
    assert machines_line({"a": "X", "c": None}) == expected
    assert machines_line({"a": None}) == "Trained on: not recorded.\n"
