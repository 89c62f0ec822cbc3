"""Distributed training on gloo CPU ranks: the global batch, DDP and FSDP2 parity, resume across world sizes, CLI.

A run must compute the same thing whatever the number of processes: the same samples per step, the same logged
(global) loss, the same weights; a checkpoint written by W ranks continues on W' ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distributed_utils import run_on_ranks
from vlkit.data.readers import ResumableSampler
from vlkit.train import StepOutput, TrainConfig, Trainer
from vlkit.train.distributed import GlobalBatchSampler, rank_seed

STEPS = 6
CONFIG = {"steps": STEPS, "batch_size": 8, "grad_accum": 2, "lr": 2e-2, "warmup_steps": 1, "save_every": 3}


class IndexedRegression(Dataset):
    """``y = sin(x . w)`` with the sample index, so a test can see which samples each rank trained on."""

    def __init__(self, length: int = 20) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(length, 4, generator=generator)
        self.targets = (self.inputs @ torch.randn(4, 1, generator=generator)).sin()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.inputs[index], "y": self.targets[index], "index": torch.tensor(index)}


class BlockModel(nn.Module):
    """Two residual blocks in a ``blocks`` list: FSDP2 shards each block, then the root (stem and head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(inputs)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden)


def train_toy(
    out_dir: Path, strategy: str = "ddp", crash_at_step: int | None = None, resume: bool = False, num_workers: int = 0
) -> dict[str, Any]:
    """Train ``BlockModel``; with ``crash_at_step`` raise in that step (after the step-3 checkpoint)."""
    seen: list[list[int]] = []
    config = TrainConfig(**CONFIG, precision="fp32", progress=False, num_workers=num_workers, eval_every=3)

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if crash_at_step is not None and len(seen) == (crash_at_step - 1) * config.grad_accum:
            raise RuntimeError("simulated crash")
        seen.append(batch["index"].tolist())
        prediction = model(batch["x"])
        return StepOutput(nn.functional.mse_loss(prediction, batch["y"]), {"mean": prediction.mean().item()})

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"output": model(torch.linspace(-1, 1, 8).reshape(2, 4)).sum().item()}

    trainer = Trainer(
        BlockModel(), config, IndexedRegression(), None, step_fn, out_dir, evaluate=evaluate, strategy=strategy
    )
    try:
        result = trainer.fit(resume=resume)
    except RuntimeError as error:
        if "simulated crash" not in str(error):
            raise
        return {"seen": seen, "crashed": True}
    return {"seen": seen, "state": trainer.full_state_dict(), "eval": result.final_eval}


def losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def _two_rank_runs(rank: int, world_size: int, root: str, strategy: str) -> dict[str, Any]:
    """On 2 ranks: an uninterrupted run, a run that crashes in step 5, and the resumption of a 1-rank crash."""
    root_path = Path(root)
    full = train_toy(root_path / "full2", strategy, num_workers=2 if strategy == "ddp" else 0)
    train_toy(root_path / "crash2", strategy, crash_at_step=5)
    resumed = train_toy(root_path / "crash1", strategy, resume=True)
    return {"full": full, "resumed": resumed}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("single") / "run"
    return out, train_toy(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_and_resume_across_world_sizes(
    tmp_path: Path, strategy: str, single_process_run: tuple[Path, dict[str, Any]]
) -> None:
    reference_dir, reference = single_process_run
    # A single process crashes after its step-3 checkpoint, for the two ranks to resume (1 -> 2).
    assert train_toy(tmp_path / "crash1", strategy, crash_at_step=5)["crashed"]
    rank0, rank1 = run_on_ranks(_two_rank_runs, 2, args=(str(tmp_path), strategy), timeout=150)

    # Same global loss at every step, same weights, same evaluation on both ranks.
    assert losses(tmp_path / "full2") == pytest.approx(losses(reference_dir), rel=1e-5)
    assert_same_weights(reference["state"], rank0["full"]["state"])
    assert rank1["full"]["state"] == {}  # the full state is gathered to rank 0 only
    assert rank0["full"]["eval"] == rank1["full"]["eval"]
    assert rank0["full"]["eval"]["output"] == pytest.approx(reference["eval"]["output"], rel=1e-5)

    # Rank r's micro-batch is the r-th half of the single-process micro-batch (also with 2 loader workers each).
    for ours, first, second in zip(reference["seen"], rank0["full"]["seen"], rank1["full"]["seen"], strict=True):
        assert first + second == ours
    # 20 samples, global micro-batches of 4: 5 micro-batches an epoch, every sample once across ranks and workers.
    for epoch in range(2):
        chunk = slice(epoch * 5, epoch * 5 + 5)
        seen = [i for part in (rank0["full"]["seen"][chunk], rank1["full"]["seen"][chunk]) for b in part for i in b]
        assert sorted(seen) == list(range(20))

    # 1 -> 2 ranks: the resumed run ends where the uninterrupted one does, and its log is complete.
    assert_same_weights(reference["state"], rank0["resumed"]["state"])
    assert losses(tmp_path / "crash1") == pytest.approx(losses(reference_dir), rel=1e-5)
    # 2 -> 1 rank.
    checkpoint = tmp_path / "crash2" / "checkpoints" / "step_00000003"
    assert (checkpoint / "dcp").is_dir() == (strategy == "fsdp")
    with pytest.warns(UserWarning, match="written by 2 process"):
        resumed = train_toy(tmp_path / "crash2", strategy, resume=True)
    assert_same_weights(reference["state"], resumed["state"])
    assert losses(tmp_path / "crash2") == pytest.approx(losses(reference_dir), rel=1e-5)


def test_checkpoint_strategy_mismatch_is_a_clear_error(
    tmp_path: Path, single_process_run: tuple[Path, dict[str, Any]]
) -> None:
    reference_dir, _ = single_process_run
    with pytest.raises(ValueError, match="--strategy ddp"):
        train_toy(reference_dir, "fsdp", resume=True)


@pytest.mark.parametrize(("length", "world_size", "num_workers"), [(24, 2, 0), (24, 4, 2), (23, 2, 2), (23, 3, 0)])
def test_global_batches_are_split_without_duplicates_or_drops(length: int, world_size: int, num_workers: int) -> None:
    global_micro_batch = 6 if world_size != 4 else 8
    order = ResumableSampler(range(length), seed=11)
    single = [batch.tolist() for batch in DataLoader(range(length), batch_size=global_micro_batch, sampler=order,
                                                     drop_last=True)]  # fmt: skip
    per_rank = []
    for rank in range(world_size):
        sampler = GlobalBatchSampler(order, global_micro_batch, rank, world_size)
        loader = DataLoader(
            range(length), batch_size=global_micro_batch // world_size, sampler=sampler, num_workers=num_workers
        )
        per_rank.append([batch.tolist() for batch in loader])
        assert len(sampler) == len(single) * global_micro_batch // world_size
    # Step by step, the ranks' batches in rank order are the single-process batch.
    assert [[index for part in parts for index in part] for parts in zip(*per_rank, strict=True)] == single
    consumed = sorted(index for batches in per_rank for batch in batches for index in batch)
    assert len(consumed) == len(set(consumed)) == length // global_micro_batch * global_micro_batch


def test_rank_seeds_are_distinct_and_rank_zero_keeps_the_seed() -> None:
    assert rank_seed(5, 0) == 5
    seeds = [rank_seed(5, rank) for rank in range(1, 4)]
    assert len({5, *seeds}) == 4 and seeds == [rank_seed(5, rank) for rank in range(1, 4)]
    assert rank_seed(6, 1) != rank_seed(5, 1)


def test_global_batch_must_divide_across_ranks_and_accumulation() -> None:
    config = TrainConfig(steps=1, batch_size=12, grad_accum=2, lr=1e-3)
    assert config.local_micro_batch_size(3) == 2
    with pytest.raises(ValueError, match=r"grad_accum \(2\) x world size \(4\) = 8"):
        config.local_micro_batch_size(4)
    with pytest.raises(ValueError, match="multiple of the world size"):
        GlobalBatchSampler(ResumableSampler(range(10)), 5, 0, 2)


def _shard_ids(caption: str) -> list[int]:
    return [int(caption.split()[-1]) + 1]  # the token id carries the sample id


def _no_pixels(image: object) -> torch.Tensor:
    return torch.zeros(1)


def _stream_on_ranks(rank: int, world_size: int, shard_dir: str, out_dir: str) -> list[list[int]]:
    from vlkit.data.shards import make_webdataset

    dataset = make_webdataset(sorted(str(path) for path in Path(shard_dir).glob("*.tar")),
                              _no_pixels, _shard_ids, 2, seed=3)  # fmt: skip
    seen: list[list[int]] = []

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        seen.append((batch["input_ids"][:, 0] - 1).tolist())
        return StepOutput(model(batch["pixels"]).pow(2).mean())

    config = TrainConfig(steps=5, batch_size=4, lr=1e-2, precision="fp32", progress=False, num_workers=2)
    Trainer(nn.Linear(1, 1), config, dataset, None, step_fn, Path(out_dir)).fit()
    return seen


def test_webdataset_shards_split_across_ranks_and_workers(tmp_path: Path) -> None:
    from PIL import Image
    from webdataset import TarWriter

    image = tmp_path / "pixel.png"
    Image.new("RGB", (4, 4), "red").save(image)
    sizes = (4, 4, 4, 6)  # unequal shards: one rank runs dry first and the epoch must end on both
    sample_id = 0
    for shard, size in enumerate(sizes):
        with TarWriter(str(tmp_path / f"shard-{shard}.tar")) as writer:
            for _ in range(size):
                writer.write({"__key__": f"{sample_id:04d}", "png": image.read_bytes(), "txt": f"sample {sample_id}"})
                sample_id += 1
    rank0, rank1 = run_on_ranks(_stream_on_ranks, 2, args=(str(tmp_path), str(tmp_path / "run")), timeout=120)
    assert len(rank0) == len(rank1) == 5  # both ranks ran every step: nobody was left in a collective
    # Each rank has 2 workers with one shard each; 2 samples per rank per step. An epoch ends when the first
    # rank runs out (4 steps here: 4 shards of >= 4 samples, 2 per worker-batch), so per epoch no sample repeats.
    epoch = [index for steps in (rank0[:4], rank1[:4]) for batch in steps for index in batch]
    assert len(epoch) == len(set(epoch)) == 16
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 0, 0, 0, 1]


# --- end to end through the CLI: `vlkit train --nproc 2` logs the losses of the single-process run -------------

TINY = [
    "--set", "data.train_size=32", "data.eval_size=8", "train.batch_size=16", "train.eval_every=null",
    "train.warmup_steps=1",
    "model.vision.depth=1", "model.text.depth=1", "model.vision.dim=32", "model.vision.num_heads=2",
    "model.vision.mlp_dim=64", "model.text.dim=32", "model.text.num_heads=2", "model.text.mlp_dim=64",
    "model.embed_dim=16",
]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, timeout=180, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"vlkit {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def single_process_cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "one"
    run_cli(*CLI_ARGS, "--out", str(out))
    return out


CLI_ARGS = ["train", "--recipe", "siglip_shapes", "--steps", "3", "--precision", "fp32", "--device", "cpu", "--quiet",
            *TINY]  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cli_two_processes_log_the_single_process_losses(
    tmp_path: Path, strategy: str, single_process_cli_run: Path
) -> None:
    out = tmp_path / "two"
    run_cli(*CLI_ARGS, "--out", str(out), "--nproc", "2", "--strategy", strategy, "--save-every", "2")
    single, double = losses(single_process_cli_run / "stages" / "0-train"), losses(out / "stages" / "0-train")
    assert len(single) == 3
    # Needs the distributed-correct SigLipLoss: with a local-only loss the two ranks' mean differs.
    assert double == pytest.approx(single, rel=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = json.loads((single_process_cli_run / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert metrics["zero_shot_top1"] == pytest.approx(expected["zero_shot_top1"], abs=1 / 8 + 1e-9)
    # The final model is the ordinary single-file vlkit model, also when FSDP trained it sharded.
    import vlkit

    ours, reference = vlkit.from_pretrained(out / "model"), vlkit.from_pretrained(single_process_cli_run / "model")
    for (name, value), expected_value in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(value, expected_value, rtol=1e-3, atol=1e-5, msg=name)
    checkpoint = out / "stages" / "0-train" / "checkpoints" / "step_00000002"
    assert (checkpoint / ("dcp" if strategy == "fsdp" else "model.safetensors")).exists()
