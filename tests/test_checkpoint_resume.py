"""Checkpoints: exact round trips, atomic publication, and a SIGKILLed run that resumes bit-identically."""

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, Sampler

from vlkit.train import StepOutput, TrainConfig, Trainer, load_checkpoint, load_latest, save_checkpoint


class TiedModel(nn.Module):
    """A language-model-like toy whose output projection shares the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.output = nn.Linear(6, 10, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(self.embedding(ids)))


def trained_pair() -> tuple[TiedModel, torch.optim.AdamW]:
    model = TiedModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.arange(10)).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, optimizer = trained_pair()
    path = save_checkpoint(tmp_path, 2, model, optimizer, {"note": "x"})
    expected_draws = (torch.rand(3).tolist(), random.random(), np.random.rand())

    torch.manual_seed(1)
    restored, restored_optimizer = trained_pair()
    state = load_checkpoint(path, restored, restored_optimizer)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected_draws
    assert state["step"] == 2 and state["note"] == "x"
    assert restored.output.weight is restored.embedding.weight
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    saved, loaded = optimizer.state_dict(), restored_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, values in saved["state"].items():
        for name, value in values.items():
            assert torch.equal(value, loaded["state"][index][name]), (index, name)
    assert set(load_file(path / "optimizer.safetensors")) >= {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"}


def test_leftover_temp_dir_is_ignored_and_old_checkpoints_pruned(tmp_path: Path) -> None:
    model, optimizer = trained_pair()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep_checkpoints=2)
    root = tmp_path / "checkpoints"
    assert sorted(path.name for path in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert (root / "latest").read_text().strip() == "step_00000003"

    # A run killed mid-write leaves an unpublished temporary folder (and maybe no pointer update).
    leftover = root / ".tmp-step_00000009-4242"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"truncated")
    assert load_latest(tmp_path) == root / "step_00000003"
    (root / "latest").unlink()
    assert load_latest(tmp_path) == root / "step_00000003"
    (root / "latest").write_text("step_00000099\n")
    assert load_latest(tmp_path) == root / "step_00000003"
    (root / "latest").write_bytes(b"step_\xb00000002\n")  # a flipped bit: undecodable, names no folder
    assert load_latest(tmp_path) == root / "step_00000003"

    save_checkpoint(tmp_path, 4, model, optimizer, {})
    assert not leftover.exists()
    assert load_latest(tmp_path) == root / "step_00000004"
    assert load_latest(tmp_path / "nowhere") is None


def test_pruning_keeps_the_checkpoint_just_written_after_an_older_resume(tmp_path: Path) -> None:
    """A run resumed from step 100 because step 200 was damaged: saving step 150 keeps step 150 (and 100, within
    keep_checkpoints) and prunes the abandoned step 200, so the newest intact checkpoint is the one just written."""
    model, optimizer = trained_pair()
    for step in (100, 200):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep_checkpoints=2)
    root = tmp_path / "checkpoints"
    (root / "step_00000200" / "model.safetensors").write_bytes(b"damaged")
    save_checkpoint(tmp_path, 150, model, optimizer, {}, keep_checkpoints=2)
    assert sorted(path.name for path in root.glob("step_*")) == ["step_00000100", "step_00000150"]
    save_checkpoint(tmp_path, 160, model, optimizer, {}, keep_checkpoints=1)
    assert sorted(path.name for path in root.glob("step_*")) == ["step_00000160"]
    assert load_latest(tmp_path) == root / "step_00000160"


class IndexedDataset(Dataset):
    """Returns each sample's index and records the epochs the trainer announces."""

    def __init__(self, length: int) -> None:
        self.inputs = torch.randn(length, 4, generator=torch.Generator().manual_seed(0))
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.inputs[index], "index": torch.tensor(index)}

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def readers_sampler(length: int, seed: int) -> Sampler[int]:
    from vlkit.data.readers import ResumableSampler  # vlkit's own module: an import error must fail, not skip

    return ResumableSampler(range(length), seed=seed)


@pytest.mark.parametrize("sampler_factory", [None, readers_sampler], ids=["fallback", "readers"])
def test_crashed_run_resumes_the_data_order(tmp_path: Path, sampler_factory: object) -> None:
    # 12 samples in micro-batches of 2 are 3 steps an epoch, so the step-3 checkpoint sits on an epoch boundary.
    config = TrainConfig(steps=8, batch_size=4, grad_accum=2, lr=1e-2, save_every=3, precision="fp32", progress=False)

    def train(out_dir: Path, crash_after: int | None, resume: bool) -> tuple[list[list[int]], list[int]]:
        seen: list[list[int]] = []
        dataset = IndexedDataset(12)

        def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
            if len(seen) == crash_after:
                raise RuntimeError("simulated crash")
            seen.append(batch["index"].tolist())
            return StepOutput(loss=model(batch["x"]).pow(2).mean())

        trainer = Trainer(nn.Linear(4, 1), config, dataset, None, step_fn, out_dir, sampler_factory=sampler_factory)
        if crash_after is None:
            trainer.fit(resume=resume)
        else:
            with pytest.raises(RuntimeError, match="simulated crash"):
                trainer.fit(resume=resume)
        return seen, dataset.epochs

    full, full_epochs = train(tmp_path / "full", None, False)
    first, _ = train(tmp_path / "crashed", 8, False)
    assert first == full[:8]
    resumed, resumed_epochs = train(tmp_path / "crashed", None, True)
    assert resumed == full[6:]
    assert full_epochs == [0, 1, 2] and resumed_epochs == [1, 2]
    for epoch_start in (0, 6):
        assert sorted(index for batch in full[epoch_start : epoch_start + 6] for index in batch) == list(range(12))


def test_resume_takes_the_configs_learning_rate_and_weight_decay(tmp_path: Path) -> None:
    """Resuming with a lower lr (what the non-finite-loss error advises) trains at that lr, with the moments kept;
    the unchanged config resumes at the checkpoint's values."""

    def trainer(lr: float, steps: int, weight_decay: float) -> Trainer:
        config = TrainConfig(steps=steps, batch_size=4, lr=lr, weight_decay=weight_decay, schedule="constant",
                             warmup_steps=0, save_every=2, precision="fp32", progress=False)  # fmt: skip

        def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
            return StepOutput(loss=model(batch["x"]).pow(2).mean())

        torch.manual_seed(0)
        return Trainer(nn.Linear(4, 1), config, IndexedDataset(12), None, step_fn, tmp_path)

    trainer(1e-2, 2, weight_decay=0.05).fit()
    with pytest.warns(UserWarning, match="differs from the checkpoint"):
        resumed = trainer(1e-4, 4, weight_decay=0.1)
        resumed.fit(resume=True)
    groups = resumed.optimizer.param_groups
    assert [group["lr"] for group in groups] == [pytest.approx(1e-4)] * 2
    assert [group["initial_lr"] for group in groups] == resumed.scheduler.base_lrs == [pytest.approx(1e-4)] * 2
    assert max(group["weight_decay"] for group in groups) == pytest.approx(0.1)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged if "lr" in record][-2:] == [3, 4]
    assert all(record["lr"] == pytest.approx(1e-4) for record in logged if record.get("step", 0) > 2 and "lr" in record)


RUN_SCRIPT = """
import os, random, signal, sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from vlkit.train import StepOutput, TrainConfig, Trainer


class NoisyDataset(Dataset):
    # Augmentation noise from numpy's global RNG, so a resume must restore it too (num_workers=0).
    def __init__(self):
        generator = torch.Generator().manual_seed(7)
        self.inputs = torch.randn(22, 8, generator=generator)
        self.targets = self.inputs.sum(dim=1, keepdim=True).sin()

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, size=8).astype(np.float32))
        return {"x": self.inputs[index] + noise, "y": self.targets[index], "bad": index % 5 == 0}


def collate(samples):
    kept = [sample for sample in samples if not sample["bad"]]
    return {
        "x": torch.stack([sample["x"] for sample in kept]),
        "y": torch.stack([sample["y"] for sample in kept]),
        "skipped": len(samples) - len(kept),
    }


out_dir, mode = Path(sys.argv[1]), sys.argv[2]
calls = 0


def step_fn(model, batch):
    global calls
    calls += 1
    if mode == "kill" and calls == 13:  # first micro-batch of step 7 (grad_accum=2)
        os.kill(os.getpid(), signal.SIGKILL)
    prediction = model(batch["x"]) * (1.0 + 0.01 * random.random())
    return StepOutput(loss=nn.functional.mse_loss(prediction, batch["y"]), metrics={"batch": len(batch["x"])})


def evaluate(model):
    return {"mse": nn.functional.mse_loss(model(torch.ones(2, 8)), torch.zeros(2, 1)).item()}


torch.manual_seed(1234)
model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 1))
config = TrainConfig(
    steps=12, batch_size=6, grad_accum=2, lr=3e-2, warmup_steps=2, precision="fp32",
    save_every=3, eval_every=4, progress=False, seed=5,
)
trainer = Trainer(model, config, NoisyDataset(), collate, step_fn, out_dir, evaluate=evaluate)
result = trainer.fit(resume=mode == "resume")
save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(out_dir / "final.safetensors"))
print("skipped", result.skipped)
"""


def run(script: Path, out_dir: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(out_dir), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def comparable_log(out_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "samples_per_second"} for record in records]


def test_sigkilled_run_resumes_bit_identically(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN_SCRIPT))
    interrupted, uninterrupted = tmp_path / "interrupted", tmp_path / "uninterrupted"
    killed, full = run(script, interrupted, "kill"), run(script, uninterrupted, "full")
    killed_output, full_output = killed.communicate(timeout=120), full.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed_output[1]
    assert full.returncode == 0, full_output[1]
    assert load_latest(interrupted) == interrupted / "checkpoints" / "step_00000006"
    assert [record["step"] for record in comparable_log(interrupted) if "loss" in record] == list(range(1, 7))

    resumed = run(script, interrupted, "resume")
    resumed_output = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, resumed_output[1]
    assert resumed_output[0] == full_output[0]

    expected, actual = load_file(uninterrupted / "final.safetensors"), load_file(interrupted / "final.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    expected_log, actual_log = comparable_log(uninterrupted), comparable_log(interrupted)
    assert [record["step"] for record in actual_log if "loss" in record] == list(range(1, 13))
    assert sum("eval" in record for record in actual_log) == 3
    assert actual_log == expected_log
    assert expected_log[-1]["step"] == 12 and expected_log[-2]["skipped"] > 0
