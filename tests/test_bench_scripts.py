"""``bench/train_step.py --quick`` and ``bench/profile_step.py --quick`` run end to end and write sane results."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from run_utils import TINY_DUAL_ENCODER
from vlkit.recipes import get_recipe
from vlkit.recipes.run import run_recipe

BENCH = Path(__file__).parents[1] / "bench"


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_train_step_quick_writes_both_libraries_times_peaks_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    _run("train_step.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    for name in ("clip", "convnext"):
        for precision in ("fp32", "bf16"):
            row = result[name][precision]
            for library in ("vlkit", "reference"):
                assert row[f"{library}_step_s"] > 0 and row[f"{library}_cpu_s"] > 0
                memory = row["memory"][library]
                assert memory["step_peak_mib"] > 0 and memory["state_mib"] > 0
                assert memory["peak_mib"] == pytest.approx(memory["step_peak_mib"] + memory["state_mib"])
            # The same architecture on both sides, and every ratio is vlkit's number over the reference's.
            assert row["parameters"]["vlkit"] == row["parameters"]["reference"]
            assert row["ratio"] == pytest.approx(row["vlkit_step_s"] / row["reference_step_s"])
            assert row["ratio_cpu_time"] == pytest.approx(row["vlkit_cpu_s"] / row["reference_cpu_s"])
            assert row["ratio_min"] == pytest.approx(min(row["vlkit_steps_s"]) / min(row["reference_steps_s"]))
            peaks = row["memory"]
            assert row["memory_ratio"] == pytest.approx(
                peaks["vlkit"]["step_peak_mib"] / peaks["reference"]["step_peak_mib"]
            )
            assert row["gflops_achieved"]["vlkit"] > 0
    shapes = result["shapes"]
    for precision in ("fp32", "bf16"):
        assert shapes[precision]["vlkit_step_s"] > 0 and shapes[precision]["vlkit_cpu_s"] > 0
        assert shapes[precision]["memory"]["vlkit"]["step_peak_mib"] > 0
    ratios = shapes["bf16_over_fp32"]
    assert ratios["ratio"] == pytest.approx(shapes["bf16"]["vlkit_step_s"] / shapes["fp32"]["vlkit_step_s"])
    assert ratios["ratio_cpu_time"] == pytest.approx(shapes["bf16"]["vlkit_cpu_s"] / shapes["fp32"]["vlkit_cpu_s"])
    machine = result["machine"]
    for precision in ("fp32", "bf16"):
        runs = machine["matmul_peaks_gflops"]
        best = max(max(runs["before"][precision].values()), max(runs["after"][precision].values()))
        assert machine[f"{precision}_matmul_peak_gflops"] == best > 0
        assert set(runs["before"][precision]) == {"128", "256"}
    assert machine["cpu_model"] and isinstance(machine["amx"], bool) and isinstance(machine["avx512_bf16"], bool)
    assert result["config"]["quick"] is True


def test_cpu_kernels_quick_times_every_way_and_checks_the_gradients(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    _run("cpu_kernels.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["quick"] is True and len(result["attention"]) == 4
    for row in result["attention"]:
        for way in ("bf16", "fp32", "bf16_fwd_fp32_bwd", "products", "vlkit"):
            assert row[f"{way}_ms"] > 0
            assert 0 < row[f"{way}_grad_error"] < 0.05, (way, row)  # bf16 gradients, against fp64 attention
        assert isinstance(row["vlkit_fp32_backward"], bool) and isinstance(row["products_allowed_here"], bool)
    for precision in ("bf16", "fp32"):
        gelu = result["quick_gelu"][precision]
        assert gelu["speedup"] == pytest.approx(gelu["plain_ms"] / gelu["vlkit_ms"])


def test_attention_step_times_both_settings_in_alternation(tmp_path: Path) -> None:
    out = tmp_path / "attention_step.json"
    _run("attention_step.py", "--case", "siglip", "--rounds", "2", "--steps", "1", "--batch", "8", "--warmup", "1",
         "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert {name: len(values) for name, values in result["seconds"].items()} == {"products": 2, "kernel": 2}
    assert result["speedup"] == pytest.approx(result["median_s"]["kernel"] / result["median_s"]["products"])
    assert result["batch_size"] == 8 and isinstance(result["products_in_use"], bool)


def test_profile_step_quick_attributes_every_op_once(tmp_path: Path) -> None:
    _run("profile_step.py", "--quick", "--models", "shapes", "--precisions", "fp32,bf16", "--out", str(tmp_path))
    assert (tmp_path / "summary.md").exists()
    for precision in ("fp32", "bf16"):
        result = json.loads((tmp_path / f"shapes_{precision}_cpu.json").read_text())
        total = result["total_ms"]
        assert total > 0
        # Kinds, groups and ops are three partitions of the same self times.
        assert sum(result["kinds_ms"].values()) == pytest.approx(total)
        assert sum(sum(phases.values()) for phases in result["groups_ms"].values()) == pytest.approx(total)
        assert sum(op["self_ms"] for op in result["ops"]) == pytest.approx(total)
        groups = result["groups_ms"]
        # The model's matmuls land in its MLP and attention groups, forward and backward, and the loss and the
        # optimizer in theirs: the scopes and the sequence-number link to the backward both worked.
        for group in ("MLP linears", "attention qkv/out projections", "attention core (SDPA, reshapes)"):
            assert groups[group]["forward"] > 0 and groups[group]["backward"] > 0
        assert groups["optimizer"]["optimizer"] > 0 and groups["loss"]["loss"] > 0
        assert result["group_kinds_ms"]["MLP linears"]["GEMM"] > 0
        # SDPA's kernel, or its two products (bf16 training on a CPU without AMX: layers/attention.py)
        core = result["group_kinds_ms"]["attention core (SDPA, reshapes)"]
        assert core.get("attention kernel (SDPA)", 0) + core.get("GEMM", 0) > 0
        assert result["kinds_ms"]["optimizer kernels"] > 0
        markdown = (tmp_path / f"shapes_{precision}_cpu.md").read_text()
        assert "| MLP linears |" in markdown and "aten::" in markdown


def test_profile_step_quick_profiles_the_vlm_instruct_steps(tmp_path: Path) -> None:
    _run("profile_step.py", "--quick", "--models", "llava,honeybee", "--precisions", "bf16", "--out", str(tmp_path))
    for name in ("llava", "honeybee"):
        result = json.loads((tmp_path / f"{name}_bf16_cpu.json").read_text())
        assert sum(result["kinds_ms"].values()) == pytest.approx(result["total_ms"])
        groups = result["groups_ms"]
        # The language model's blocks are scoped like the towers': its matmuls and attention, forward and backward.
        for group in ("MLP linears", "attention qkv/out projections", "attention core (SDPA, reshapes)"):
            assert groups[group]["forward"] > 0 and groups[group]["backward"] > 0, (name, group)
        assert groups["optimizer"]["optimizer"] > 0
        # The bridge is one group, trained (forward and backward) where the tower is frozen.
        assert groups["bridge"]["forward"] > 0 and groups["bridge"]["backward"] > 0, name
        # Only the bridge's and the LM's parameters train.
        assert result["parameters"] > result["trained_parameters"] > 0
    # The C-Abstractor's convolutions are its own: in its bridge group, absent from the MLP bridge's.
    honeybee = json.loads((tmp_path / "honeybee_bf16_cpu.json").read_text())
    llava = json.loads((tmp_path / "llava_bf16_cpu.json").read_text())
    assert honeybee["group_kinds_ms"]["bridge"].get("convolution", 0) > 0
    assert llava["group_kinds_ms"]["bridge"].get("convolution", 0) == 0


def test_host_memory_quick_times_both_settings_in_their_own_processes(tmp_path: Path) -> None:
    out = tmp_path / "host_memory.json"
    _run("host_memory.py", "--quick", "--models", "shapes", "--threads", "1", "--out", str(out))
    result = json.loads(out.read_text())
    runs = result["models"]["shapes"]["runs"]
    assert [run["keep_freed_memory"] for run in runs] == [False, True]
    for run in runs:
        assert run["median_s"] > 0 and run["peak_rss_mb"] > 0 and len(run["step_s"]) == 2
    # The default process never set the thresholds; the kept one did where the C library is glibc.
    assert runs[0]["applied"] is False and runs[1]["applied"] is (platform.libc_ver()[0] == "glibc")
    assert result["models"]["shapes"]["speedup"] == pytest.approx(runs[0]["median_s"] / runs[1]["median_s"])
    assert result["quick"] is True and "cpu_model" in result


def test_heldout_probe_reads_both_towers_on_seen_and_heldout_images(tmp_path: Path) -> None:
    tiny = {**TINY_DUAL_ENCODER, "train.steps": 3, "train.batch_size": 8, "train.eval_every": None,
            "train.precision": "fp32", "data.train_size": 16, "data.eval_size": 8}  # fmt: skip
    run_recipe(get_recipe("siglip_shapes").with_overrides(tiny), tmp_path / "run", progress=False, report=False)
    out = tmp_path / "probe.json"
    model = str(tmp_path / "run" / "model")
    _run("heldout_probe.py", "--model", model, "--out", str(out), "--size", "20", "--fit", "40")
    (result,) = json.loads(out.read_text())["results"].values()
    assert set(result) == {"val", "val_heldout"}
    for row in result.values():
        assert set(row) == {"top1", "shape_within_colour", "grey_prompt_shape", "image_probe_shape", "text_probe_shape"}
        assert all(0.0 <= value <= 1.0 for value in row.values())
        # A 40-way hit is a hit among its own colour's five prompts too.
        assert row["shape_within_colour"] >= row["top1"]


def test_row_counts_times_every_pass_and_rounds_to_few_shapes(tmp_path: Path) -> None:
    out = tmp_path / "row_counts.json"
    _run("row_counts.py", "--width", "16", "--features", "32", "--counts", "6", "--low", "100", "--high", "300",
         "--multiple", "64", "--threads", "1", "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"one_count", "new_counts", "same_counts_again", "rounded"}
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert 1 <= result["distinct_rounded"] <= 4 and "cpu_model" in result  # 100-300 rounded up to 64: 128 ... 320


def test_data_path_quick_times_both_datasets_with_the_caches_off_and_on(tmp_path: Path) -> None:
    out = tmp_path / "data_path.json"
    _run("data_path.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["tower"]["batch_size"] == 64 and result["instruct"]["batch_size"] == 32
    for name in ("tower", "instruct"):
        row = result[name]
        for setting in ("off", "on"):
            assert all(row[setting][f"{visit}_ms"] > 0 for visit in ("first_visit", "later_epoch"))
        assert row["later_epoch_speedup"] == pytest.approx(row["off"]["later_epoch_ms"] / row["on"]["later_epoch_ms"])
    assert result["batches"] == 3 and "cpu_model" in result["machine"]
