"""``precision="auto"``: the measurement picks a precision, leaves the model and the random state untouched, is
cached, and a run records what it resolved to and keeps it on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import vlkit.cpuinfo
from vlkit.train import StepOutput, TrainConfig, Trainer
from vlkit.train import precision as precision_module
from vlkit.train.precision import measure_precision


class Regression(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        return {"x": torch.randn(8, generator=generator), "y": torch.randn(1, generator=generator)}


def step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    return StepOutput(loss=nn.functional.mse_loss(model(batch["x"]).float(), batch["y"]))


def test_measurement_leaves_no_trace_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "bf16_emulated", lambda: False)  # measured, whatever this CPU is
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    batch = {"x": torch.randn(4, 8), "y": torch.randn(4, 1)}
    rng = torch.get_rng_state()
    choice, seconds = measure_precision(model, step, batch, torch.device("cpu"))
    assert choice in ("fp32", "bf16") and set(seconds) == {"fp32", "bf16"}
    assert (choice == "bf16") == (seconds["fp32"] >= 1.1 * seconds["bf16"])
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew nothing from the run's stream
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())
    cached = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert [entry["precision"] for entry in cached.values()] == [choice]
    # Cached: the same model and batch shape are not measured again; another batch shape is.
    assert measure_precision(model, step, batch, torch.device("cpu")) == (choice, {})
    other = {"x": torch.randn(2, 8), "y": torch.randn(2, 1)}
    assert measure_precision(model, step, other, torch.device("cpu"))[1]


def test_a_cpu_without_bf16_hardware_trains_in_fp32_without_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x86 with AVX2 at most: oneDNN emulates bf16 there (each bf16 pass 1.6-13x fp32's), so ``auto`` is fp32 at
    once; AVX-512 or AMX, or a CPU that lists no x86 flags (ARM: "Features"), is measured."""
    entry = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 fma avx avx2 {}\n"
    for flags, emulated in (("", True), ("avx512f avx512bw", False), ("avx512f avx512_bf16", False),
                            ("amx_bf16 amx_tile", False)):  # fmt: skip
        monkeypatch.setattr(vlkit.cpuinfo, "cpuinfo_text", lambda flags=flags: entry.format(flags))
        assert vlkit.cpuinfo.bf16_emulated() is emulated, flags
    monkeypatch.setattr(vlkit.cpuinfo, "cpuinfo_text", lambda: "processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert vlkit.cpuinfo.bf16_emulated() is False
    monkeypatch.setattr(vlkit.cpuinfo, "cpuinfo_text", lambda: "")  # no /proc/cpuinfo: measured
    assert vlkit.cpuinfo.bf16_emulated() is False

    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "bf16_emulated", lambda: True)
    calls = []

    def counted(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        calls.append(1)
        return step(model, batch)

    batch = {"x": torch.randn(4, 8), "y": torch.randn(4, 1)}
    model = nn.Linear(8, 1)
    assert measure_precision(model, counted, batch, torch.device("cpu")) == ("fp32", {})
    assert not calls and not (tmp_path / "cache" / "precision.json").exists()


def test_the_cache_tells_machines_apart_by_the_instruction_sets_that_decide_bf16() -> None:
    """Two virtual machines that both call themselves "AMD EPYC", with and without avx512_bf16, must not share a
    cached answer (bf16 was 13x slower than fp32 on the one without)."""
    entry = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 {}\nprocessor\t: 1\nflags\t\t: amx_bf16\n"
    with_bf16 = precision_module._describe_cpu(entry.format("avx512f avx512_bf16"), "x86_64")
    without = precision_module._describe_cpu(entry.format(""), "x86_64")
    assert with_bf16 == "AMD EPYC|avx2+avx512f+avx512_bf16" and without == "AMD EPYC|avx2"
    assert precision_module._describe_cpu("", "x86_64") == "x86_64|-"  # no /proc/cpuinfo: the platform's name


def test_a_machine_is_described_by_its_cpu_flags_threads_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    monkeypatch.setattr(vlkit.cpuinfo, "cpuinfo_text", lambda: entry)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    described = vlkit.cpuinfo.describe_machine("cpu")
    assert described == f"AMD EPYC (avx2, avx512f, avx512_bf16), 3 threads, torch {torch.__version__}"
    monkeypatch.setattr(vlkit.cpuinfo, "cpuinfo_text", lambda: "processor\t: 0\nmodel name\t: Old\nflags\t: fpu\n")
    assert vlkit.cpuinfo.describe_machine().startswith("Old (no avx2 / avx512f / avx512_bf16 / amx_bf16), 3 threads")


def test_a_run_records_the_resolved_precision_and_a_resume_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    calls = []
    original = precision_module.measure_precision

    def forced(*args, **kwargs):
        calls.append(1)
        original(*args, **kwargs)
        return "bf16", {"fp32": 2.0, "bf16": 1.0}

    monkeypatch.setattr(precision_module, "measure_precision", forced)
    config = TrainConfig(steps=4, batch_size=8, lr=1e-2, save_every=2, progress=False)
    assert config.precision == "auto"

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(nn.Linear(8, 1), config, Regression(), None, step, tmp_path / "run")

    first = trainer()
    result = first.fit()
    assert result.precision == "bf16" and calls == [1]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["precision"] == "bf16"
    # Resumed from step 2: no new measurement, the saved precision.
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000002\n")
    resumed = trainer().fit(resume=True)
    assert resumed.precision == "bf16" and calls == [1]


class NoisyRegression(Regression):
    """Samples with noise from torch's global generator, as random transforms draw it."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        return {"x": sample["x"] + 0.1 * torch.randn(8), "y": sample["y"]}


def test_auto_trains_exactly_as_the_precision_it_resolves_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement's sample fetch draws from the run's generators; they are restored, so the losses of an
    "auto" run equal those of a run given the precision it chose."""
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "cache"))
    losses = {}
    for name, precision in (("auto", "auto"), ("fixed", None)):
        torch.manual_seed(0)
        config = TrainConfig(steps=4, batch_size=8, lr=1e-2, progress=False, precision=precision or losses["chosen"])
        result = Trainer(nn.Linear(8, 1), config, NoisyRegression(), None, step, tmp_path / name).fit()
        losses[name] = [
            json.loads(line)["loss"] for line in result.log_path.read_text().splitlines() if '"loss"' in line
        ]
        losses["chosen"] = result.precision
    assert losses["auto"] == losses["fixed"]
