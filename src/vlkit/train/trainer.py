"""One model-agnostic trainer for every vlkit recipe.

A recipe supplies a model, a map-style dataset with a collate function that returns a dict of tensors, and a
``step_fn(model, batch) -> StepOutput`` that computes the loss; the trainer owns everything else: AdamW over
regex parameter groups (``optim.py``), warmup + cosine schedule, gradient accumulation, bf16 autocast, gradient
clipping, a resumable data order, JSONL + TensorBoard logs, periodic evaluation and atomic checkpoints
(``checkpoint.py``). A run killed after a checkpoint and resumed with ``fit(resume=True)`` finishes
bit-identical (on CPU) to one that was never interrupted: weights, optimizer, scheduler, data position and every
RNG state are restored.

Distributed (``distributed.py``; launched by torchrun): ``config.batch_size`` is the *global* batch. Each of the W
ranks computes ``batch_size / (grad_accum * W)`` samples per micro-batch, and rank r's micro-batch is the r-th
contiguous slice of the single-process micro-batch, so a run computes the same thing whatever W is (up to
floating-point summation order). The logged loss and metrics are means over ranks; only rank 0 writes the log,
TensorBoard and checkpoints (FSDP2: every rank writes its shards). Evaluation runs on every rank on identical inputs
(FSDP2 forwards are collectives), so the ranks get identical results and nobody waits at a barrier for long.
"""

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from vlkit.eval.result import EvalResult
from vlkit.layers.attention import allow_bf16_products
from vlkit.seeding import mix_seed
from vlkit.train import distributed
from vlkit.train.checkpoint import (
    capture_rng_state,
    is_sharded_checkpoint,
    load_checkpoint,
    load_latest,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    write_text_atomic,
)
from vlkit.train.compile import Compile, compile_for_training, resolve_compile
from vlkit.train.distributed import GlobalBatchSampler, Strategy
from vlkit.train.host_memory import keep_freed_memory
from vlkit.train.optim import SCHEDULES, ParamGroupRule, Schedule, build_optimizer, build_param_groups, lr_lambda

logger = logging.getLogger(__name__)

__all__ = ["ResumableSamplerProtocol", "StepOutput", "TrainConfig", "TrainResult", "Trainer"]

# Fields that may change between an interrupted run and its resumption without changing the trajectory.
_RESUME_SAFE_FIELDS = {"eval_every", "save_every", "keep_checkpoints", "num_workers", "progress", "keep_freed_memory"}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run; ``batch_size`` is the number of samples per optimizer step, summed
    over all ranks of a distributed run (the global batch)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    optimizer: Literal["adamw", "lamb"] = "adamw"
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    compile: Compile = "auto"  # torch.compile of the modules that mark themselves worth it (vlkit.train.compile)
    keep_freed_memory: bool = True  # glibc keeps freed host memory for the next step (vlkit.train.host_memory)
    # bf16 training on a CPU without AMX (AVX-512 bf16) runs attention without a mask as two bf16 products
    # (vlkit.layers.attention.allow_bf16_products; a no-op elsewhere): the demo VLM's instruct step 1.09-1.12x
    # faster in the trainer on a 2-core EPYC. For stages that fine-tune a trained model: the products round the
    # scores to bf16, and language models trained from scratch this way gave the VLM about 0.11 less VQA, the demo's
    # image tower 7 points less held-out zero-shot (five seeds), where fine-tuning with them cost nothing measurable
    # (docs/experiments.md, the 38th, 48th and 50th sessions).
    attention_products: bool = False
    param_groups: tuple[ParamGroupRule, ...] = ()
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        # Normalise sequences so that a config read back from JSON compares equal to the one that wrote it.
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(
            self,
            "param_groups",
            tuple(rule if isinstance(rule, ParamGroupRule) else ParamGroupRule(**rule) for rule in self.param_groups),
        )
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            problems.append(f"grad_accum ({self.grad_accum}) must be >= 1 and divide batch_size ({self.batch_size})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            problems.append(f"betas must be two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            problems.append(f"eps must be > 0, got {self.eps}")
        if not 0 <= self.warmup_steps <= self.steps:
            problems.append(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.precision not in ("fp32", "bf16", "auto"):
            problems.append(f"precision must be 'fp32', 'bf16' or 'auto', got {self.precision!r}")
        if self.compile not in ("auto", "on", "off"):
            problems.append(f"compile must be 'auto', 'on' or 'off', got {self.compile!r}")
        if self.optimizer not in ("adamw", "lamb"):
            problems.append(f"optimizer must be 'adamw' or 'lamb', got {self.optimizer!r}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or None, got {value}")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def micro_batch_size(self) -> int:
        """Samples per micro-batch over all ranks together (the global micro-batch)."""
        return self.batch_size // self.grad_accum

    def local_micro_batch_size(self, world_size: int) -> int:
        """Samples per micro-batch on each of ``world_size`` ranks; a clear error if they do not divide evenly."""
        if self.batch_size % (self.grad_accum * world_size):
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch; it must be divisible by grad_accum "
                f"({self.grad_accum}) x world size ({world_size}) = {self.grad_accum * world_size}, so that every "
                "rank gets the same number of samples per micro-batch"
            )
        return self.batch_size // (self.grad_accum * world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**data)


@dataclass
class StepOutput:
    """What a ``step_fn`` returns: the scalar loss to minimise and extra per-step scalars to log."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # For a loss that is a mean over a number of items that varies from batch to batch (a token-mean LM loss: its
    # trained tokens), that number. With gradient accumulation or several processes, the step then trains on the
    # mean over every item of the global batch, as one full batch would, not the mean of the micro-batches' means.
    # None: each micro-batch counts the same (a loss over a fixed number of samples).
    weight: float | None = None


@dataclass
class TrainResult:
    """``final_eval`` holds the last evaluation's metrics, ``final_artifacts`` its artifacts (``EvalResult``)."""

    steps: int
    train_seconds: float
    final_eval: dict[str, Any]
    skipped: int
    log_path: Path
    final_artifacts: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # what the run trained in ("auto" resolved)
    compiled: bool = False  # whether the run's compile targets trained compiled ("auto" resolved)


class ResumableSamplerProtocol(Protocol):
    """A sampler whose order is a function of (seed, epoch) and that can start mid-epoch.

    ``position`` is the number of samples of the epoch already consumed; ``vlkit.data.readers.ResumableSampler``
    implements it. The trainer wants the *global* order (the same on every rank, ``num_replicas=1``) and slices it
    per rank itself, so ``position`` counts global samples and a checkpoint resumes on any number of ranks.
    """

    def __iter__(self) -> Iterator[int]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


def _default_sampler(length: int, seed: int) -> Sampler[int]:
    from vlkit.data.readers import ResumableSampler

    return ResumableSampler(range(length), seed=seed)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    return value


def _flatten_scalars(values: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten_scalars(value, f"{prefix}/{key}")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}/{key}", float(value)


class _NullLog(contextlib.nullcontext):
    """Stands in for the log file on ranks other than 0: writes go nowhere."""

    def __enter__(self) -> "_NullLog":
        return self

    def write(self, text: str) -> int:
        return len(text)


class Trainer:
    """Train ``model`` with ``step_fn`` on ``dataset`` following ``config``; write logs and checkpoints to ``out_dir``.

    ``collate_fn`` turns a list of samples into a dict of tensors; it may add ``"skipped": int`` for bad samples
    it dropped, which the trainer counts and logs; ``skipped`` is where the count starts (the items a reader skipped
    before training). ``sampler_factory(dataset_len, seed)`` builds the global data
    order (a ``ResumableSamplerProtocol`` over the whole dataset, the same on every rank; the trainer slices it per
    rank); by default a private seeded permutation sampler is used. ``strategy`` ("ddp" or "fsdp") only matters
    under an initialised process group with more than one rank; "fsdp" also selects sharded checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], dict[str, Any]] | None,
        step_fn: Callable[[nn.Module, dict[str, Any]], StepOutput],
        out_dir: Path,
        evaluate: Callable[[nn.Module], EvalResult | dict[str, Any]] | None = None,
        device: torch.device | str = "cpu",
        sampler_factory: Callable[[int, int], Sampler[int]] | None = None,
        strategy: Strategy = "ddp",
        skipped: int = 0,
    ) -> None:
        if strategy not in distributed.STRATEGIES:
            raise ValueError(f"strategy must be one of {distributed.STRATEGIES}, got {strategy!r}")
        self.device = torch.device(device)
        self.strategy = strategy
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.is_main = self.rank == 0
        self.local_micro_batch_size = config.local_micro_batch_size(self.world_size)
        self.module = model.to(self.device)
        self.config = config
        self.step_fn = step_fn
        self.evaluate = evaluate
        self.out_dir = Path(out_dir)
        self.log_path = self.out_dir / "log.jsonl"
        # A streaming (iterable) dataset, e.g. WebDataset shards, brings its own order: no sampler, and the data
        # position is the number of samples consumed in the epoch, replayed and skipped on resume.
        self.streaming = isinstance(dataset, IterableDataset)
        dataset_length = config.micro_batch_size if self.streaming else len(dataset)
        if dataset_length < config.micro_batch_size:
            raise ValueError(
                f"dataset has {dataset_length} samples, fewer than one micro-batch ({config.micro_batch_size})"
            )

        # Freezing happens here, before wrapping: DDP and FSDP2 read requires_grad when they wrap.
        groups = build_param_groups(self.module, config.param_groups, config.lr, config.weight_decay)
        if not groups:
            raise ValueError("the model has no trainable parameters after applying the param group rules")
        self.model = distributed.wrap_model(self.module, strategy, self.device)
        if distributed.is_sharded(self.model):
            # fully_shard replaced every parameter by a DTensor shard: the groups must hold the new objects.
            groups = build_param_groups(self.module, config.param_groups, config.lr, config.weight_decay)
        self.optimizer = build_optimizer(
            groups, config.optimizer, config.lr, config.betas, config.eps, config.weight_decay, self.device
        )
        self._parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
        # Modules that keep a parameter in range after each update (``after_optimizer_step``: a bounded temperature).
        self._constrained = [module for module in self.module.modules() if hasattr(module, "after_optimizer_step")]
        self.lr_factor = partial(
            lr_lambda,
            total_steps=config.steps,
            warmup_steps=config.warmup_steps,
            schedule=config.schedule,
            min_lr_ratio=config.min_lr_ratio,
        )
        self.scheduler = LambdaLR(self.optimizer, self.lr_factor)
        # Each group's hyperparameters as this run's config sets them; a resume puts them back over the checkpoint's.
        self._configured_groups = [
            {key: value for key, value in group.items() if key != "params"} for group in self.optimizer.param_groups
        ]

        self.dataset = dataset
        self.sampler = None if self.streaming else (sampler_factory or _default_sampler)(dataset_length, config.seed)
        # Extra keys a sampler saves (seed, dataset size...) let it refuse a resume whose data order would differ.
        self.sampler_state: dict[str, Any] = {}
        # Workers are seeded per rank (rank 0 as a single process would be), so ranks do not share augmentations.
        self.data_seed = distributed.rank_seed(config.seed, self.rank)
        # A private generator seeds the workers, so building a loader never consumes the global RNG stream.
        self.generator = torch.Generator().manual_seed(self.data_seed)
        self.loader = self._build_loader(collate_fn)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.precision = config.precision if config.precision != "auto" else "fp32"
        self.compiled = False
        self.skipped = skipped  # bad items the data's reader already skipped (the same on every rank); a resume reloads
        self.train_seconds = 0.0

    def _build_loader(self, collate_fn: Callable[[list[Any]], dict[str, Any]] | None) -> DataLoader:
        """This rank's loader: its slice of every global micro-batch (no sampler for a streaming dataset)."""
        rank_sampler = (
            None
            if self.sampler is None
            else GlobalBatchSampler(self.sampler, self.config.micro_batch_size, self.rank, self.world_size)
        )
        return DataLoader(
            self.dataset,
            batch_size=self.local_micro_batch_size,
            sampler=rank_sampler,
            collate_fn=collate_fn,
            drop_last=True,
            num_workers=self.config.num_workers,
            generator=self.generator,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``config.steps``; with ``resume`` continue from the latest checkpoint in ``out_dir`` if any."""
        config = self.config
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 decides, so ranks never disagree about which checkpoint (if any) they continue.
        latest = load_latest(self.out_dir) if self.is_main else None
        checkpoint = distributed.broadcast_object(latest)
        if checkpoint is not None and not resume:
            raise FileExistsError(
                f"{self.out_dir} already holds checkpoints (latest {checkpoint.name}); "
                "pass resume=True to continue that run or choose a new out_dir"
            )
        if config.keep_freed_memory:
            keep_freed_memory()
        self.model.train()
        if checkpoint is None:
            self._seed_everything()
            self.precision = self._resolve_precision()
            if self.is_main:
                write_text_atomic(self.log_path, "")
        else:
            # Restores the RNG states too, so nothing that draws random numbers may run between here and the loop.
            self._load_state(self._load_checkpoint(checkpoint))
            if self.is_main:
                self._truncate_log()
        if checkpoint is None or self.config.compile != "auto":
            sharded = distributed.is_sharded(self.model)
            self.compiled = resolve_compile(config.compile, self.module, self.device, config.steps, sharded)

        main = self.is_main
        writer = (
            SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step + 1 if checkpoint else None)
            if main
            else None
        )
        progress = tqdm(total=config.steps, initial=self.step, disable=not (config.progress and main), desc="train")
        batches = self._micro_batches()
        final_eval: EvalResult | None = None
        modes = self._training_modes()
        try:
            with open(self.log_path, "a", encoding="utf-8", buffering=1) if main else _NullLog() as log:
                while self.step < config.steps:
                    record = self._train_step(batches)
                    log.write(json.dumps(record) + "\n")
                    for key, value in record.items():
                        if key != "step" and writer is not None:
                            writer.add_scalar(f"train/{key}", value, self.step)
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}")
                    is_last = self.step == config.steps
                    due = config.eval_every is not None and self.step % config.eval_every == 0
                    if self.evaluate is not None and (due or is_last):
                        final_eval = self._run_evaluation()
                        log.write(json.dumps({"step": self.step, "eval": final_eval.metrics}) + "\n")
                        for key, value in _flatten_scalars(final_eval.metrics, "eval"):
                            if writer is not None:
                                writer.add_scalar(key, value, self.step)
                    if config.save_every is not None and (self.step % config.save_every == 0 or is_last):
                        self._save()
            if self.evaluate is not None and final_eval is None:
                # Resumed from a finished run: report the evaluation without logging a duplicate line.
                final_eval = self._run_evaluation()
        finally:
            modes.close()
            progress.close()
            if writer is not None:
                writer.close()
        final_eval = final_eval or EvalResult({})
        return TrainResult(
            self.step,
            self.train_seconds,
            final_eval.metrics,
            self.skipped,
            self.log_path,
            final_eval.artifacts,
            self.precision,
            self.compiled,
        )

    def _training_modes(self) -> contextlib.ExitStack:
        """Put the module in the run's training-only modes (its compiled blocks, the attention products of
        ``TrainConfig.attention_products``); closing the returned stack undoes them, last first, as ``fit`` does
        when it ends."""
        modes = contextlib.ExitStack()
        if self.compiled:
            modes.callback(compile_for_training(self.module))
        if self.config.attention_products:
            modes.callback(allow_bf16_products(self.module))
        return modes

    def _seed_everything(self) -> None:
        # Per-rank seeds: dropout masks must differ between ranks, and rank 0 keeps the single-process seed.
        seed = distributed.rank_seed(self.config.seed, self.rank)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The trained weights, unsharded, on rank 0 (``{}`` on the others); every rank must call it."""
        return distributed.full_state_dict(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """What ``evaluate`` receives: the plain module under DDP, the sharded module itself under FSDP2."""
        return distributed.unwrap_model(self.model)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _resolve_precision(self) -> str:
        """``config.precision``, with "auto" measured on this run's first micro-batch (``train.precision``) on one
        process; a distributed run takes bf16 on CUDA and fp32 on CPU (rank-local timings could disagree)."""
        if self.config.precision != "auto":
            return self.config.precision
        if self.world_size > 1 or self.streaming:
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            return "bf16" if bf16 else "fp32"
        from vlkit.train.precision import measure_precision

        # The sample fetch may draw random numbers (random transforms): every generator is restored after it, so
        # that "auto" trains exactly as the precision it resolves to.
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            samples = [self.dataset[index] for index in range(self.local_micro_batch_size)]
            collate = self.loader.collate_fn
            batch = _to_device(collate(samples), self.device)
            batch.pop("skipped", None)
            choice, seconds = measure_precision(self.module, self.step_fn, batch, self.device)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if seconds:
            logger.info("precision auto: %s (fp32 %.3f s, bf16 %.3f s per micro-batch)", choice, seconds["fp32"],
                        seconds["bf16"])  # fmt: skip
        return choice

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        if self.streaming:
            yield from self._streamed_micro_batches()
            return
        micro_batch_size = self.config.micro_batch_size
        while True:
            # A checkpoint taken right after an epoch's last full micro-batch resumes with nothing left to read.
            if len(self.sampler) - self.position >= micro_batch_size:
                self.sampler.set_epoch(self.epoch)
                # The trainer's own count is the truth: worker prefetching runs the sampler's counter ahead.
                self.sampler.load_state_dict({**self.sampler_state, "epoch": self.epoch, "position": self.position})
                # Readers pick per-epoch random captions; workers fork from here, so they see the new epoch.
                dataset_set_epoch = getattr(self.dataset, "set_epoch", None)
                if callable(dataset_set_epoch):
                    dataset_set_epoch(self.epoch)
                # Worker seeds derive from (seed, epoch) so a resumed epoch's workers match the uninterrupted run's.
                self.generator.manual_seed(mix_seed(self.data_seed, self.epoch))
                for batch in self.loader:
                    self.position += micro_batch_size
                    yield batch
            self.epoch += 1
            self.position = 0

    def _streamed_micro_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches of a streaming dataset; ``position`` counts global samples, whatever the world size.

        Each rank streams its own shards (the dataset splits them by rank and worker). Ranks may hold different
        numbers of samples, so in a multi-process run they agree after every micro-batch whether all of them still
        have one: the epoch ends for everybody when the first rank runs dry (its peers drop their surplus), and
        no rank is left waiting in a collective.
        """
        micro_batch_size = self.config.micro_batch_size
        while True:
            dataset_set_epoch = getattr(self.dataset, "set_epoch", None)
            if callable(dataset_set_epoch):
                dataset_set_epoch(self.epoch)
            self.generator.manual_seed(mix_seed(self.data_seed, self.epoch))
            to_skip = self.position // micro_batch_size
            yielded = False
            stream = iter(self.loader)
            while True:
                batch = next(stream, None)
                if self.world_size > 1:
                    have = torch.tensor([float(batch is not None)], device=self.device)
                    if distributed.all_reduce(have, "min").item() == 0:
                        break
                elif batch is None:
                    break
                if to_skip:
                    to_skip -= 1
                    continue
                yielded = True
                self.position += micro_batch_size
                yield batch
            if not yielded and self.position == 0:
                raise ValueError(
                    "the streaming dataset yielded no full batch in an epoch"
                    + (" on some rank (give at least world size x num_workers shards)" if self.world_size > 1 else "")
                )
            self.epoch += 1
            self.position = 0

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        config = self.config
        started = time.perf_counter()
        learning_rate = config.lr * self.lr_factor(self.step)
        loss, metric_sums, skipped = self._reduce(*self._forward_backward(batches))
        self.skipped += skipped

        # An infinite limit measures the norm for the log and scales gradients by exactly 1.0.
        max_norm = config.grad_clip if config.grad_clip is not None else math.inf
        if distributed.is_sharded(self.model):
            distributed.sync_replicated_gradients(self.model)
            grad_norm = distributed.clip_grad_norm(self._parameters, max_norm)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._parameters, max_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise FloatingPointError(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {self.step + 1}; "
                "the weights were not updated, resume from the last checkpoint with a lower lr or fp32"
            )
        self.optimizer.step()
        for module in self._constrained:  # parameters kept in range by their modules (a bounded temperature)
            module.after_optimizer_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed

        record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": learning_rate, "grad_norm": grad_norm}
        record |= {"samples_per_second": config.batch_size / elapsed, "skipped": self.skipped, "epoch": self.epoch}
        clashes = record.keys() & metric_sums.keys()
        if clashes:
            raise ValueError(f"step_fn metrics {sorted(clashes)} clash with the trainer's own log fields")
        record |= {key: value / config.grad_accum for key, value in metric_sums.items()}
        return record

    def _forward_backward(
        self, batches: Iterator[dict[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, float], int, list[float]]:
        """Forward and backward over the step's micro-batches: this process's loss sum, metric sums, skipped samples
        and, for weighted losses (``StepOutput.weight``), each micro-batch's weight."""
        config = self.config
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, float] = {}
        skipped = 0
        # Weighted losses only matter across micro-batches: one micro-batch on one process is its own normaliser,
        # and trains exactly as the plain loss.
        across = config.grad_accum > 1 or self.world_size > 1
        weights: list[float] = []
        weighted: set[bool] = set()
        for micro_index in range(config.grad_accum):
            batch = next(batches)
            if not isinstance(batch, dict):
                raise TypeError(f"collate_fn must return a dict of tensors, got {type(batch).__name__}")
            skipped += int(batch.pop("skipped", 0))
            batch = _to_device(batch, self.device)
            # DDP / FSDP2 would reduce gradients after every micro-batch; only the last one needs it.
            with distributed.gradient_sync(self.model, micro_index == config.grad_accum - 1):
                with self._autocast():
                    output = self.step_fn(self.model, batch)
                weighted.add(output.weight is not None)
                if across and output.weight is not None:
                    weights.append(float(output.weight))
                    (output.loss * weights[-1]).backward()  # the sum of its items' losses; scaled in _reduce
                    loss_sum += output.loss.detach().float() * weights[-1]
                else:
                    (output.loss / config.grad_accum).backward()
                    loss_sum += output.loss.detach().float()
            for key, value in output.metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        if len(weighted) > 1:
            raise ValueError("a step_fn must give a StepOutput.weight for every micro-batch or for none")
        return loss_sum, metric_sums, skipped, weights

    def _reduce(
        self, loss_sum: torch.Tensor, metric_sums: dict[str, float], skipped: int, weights: list[float]
    ) -> tuple[float, dict[str, float], int]:
        """The step's loss (the global batch's mean), its metric sums averaged over processes and its skipped
        samples over all processes. For weighted losses the gradients, which hold the sum of every item's gradient
        (averaged over processes by DDP / FSDP), are divided by the global number of items: the full batch's mean."""
        weight_total = sum(weights)
        if self.world_size > 1:
            # One collective for everything logged.
            names = sorted(metric_sums)
            packed = torch.tensor([loss_sum.item(), float(skipped), weight_total, *(metric_sums[n] for n in names)],
                                  dtype=torch.float64)  # fmt: skip
            packed = distributed.all_reduce(packed.to(self.device)).cpu()
            loss_total, skipped, weight_total = float(packed[0]), round(float(packed[1])), float(packed[2])
            metric_sums = {name: float(value) / self.world_size for name, value in zip(names, packed[3:], strict=True)}
        else:
            loss_total = loss_sum.item()
        if not weights:
            return loss_total / (self.world_size * self.config.grad_accum), metric_sums, skipped
        scale = self.world_size / weight_total if weight_total > 0 else 0.0
        torch._foreach_mul_([parameter.grad for parameter in self._parameters if parameter.grad is not None], scale)
        return (loss_total / weight_total if weight_total > 0 else 0.0), metric_sums, skipped

    def _run_evaluation(self) -> EvalResult:
        assert self.evaluate is not None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                result = self.evaluate(self.eval_model)
            return result if isinstance(result, EvalResult) else EvalResult(dict(result))
        finally:
            self.model.train(was_training)

    def _save(self) -> None:
        scheduler_state = {key: value for key, value in self.scheduler.state_dict().items() if key != "lr_lambdas"}
        state = {
            "sampler": {
                **(self.sampler.state_dict() if self.sampler is not None else {}),
                "epoch": self.epoch,
                "position": self.position,
            },
            "skipped": self.skipped,
            "train_seconds": self.train_seconds,
            "scheduler": scheduler_state,
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "strategy": self.strategy,
            "precision": self.precision,
            "compiled": self.compiled,
        }
        rng_states = distributed.all_gather_object(capture_rng_state())
        if self.strategy == "fsdp":
            save_sharded_checkpoint(
                self.out_dir, self.step, self.model, self.optimizer, state, self.config.keep_checkpoints, rng_states
            )
            return
        if self.is_main:
            save_checkpoint(
                self.out_dir, self.step, self.module, self.optimizer, state, self.config.keep_checkpoints, rng_states
            )
        distributed.barrier()

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Load weights, optimizer and this rank's RNG state from the format this run's strategy writes."""
        sharded = is_sharded_checkpoint(path)
        if sharded != (self.strategy == "fsdp"):
            kind = "a sharded (FSDP)" if sharded else "a single-file (DDP / single-process)"
            raise ValueError(
                f"{path} is {kind} checkpoint, but this run uses strategy {self.strategy!r}; "
                f"resume with --strategy {'fsdp' if sharded else 'ddp'}"
            )
        if sharded:
            state = load_sharded_checkpoint(path, self.model, self.optimizer, rank=self.rank)
        else:
            state = load_checkpoint(path, self.module, self.optimizer, rank=self.rank)
        if not state["rng_restored"]:
            # Written by fewer ranks: this rank starts a fresh, still deterministic, stream for the rest of the run.
            fresh = distributed.rank_seed(mix_seed(self.config.seed, int(state["step"])), self.rank)
            random.seed(fresh)
            np.random.seed(fresh % (1 << 32))
            torch.manual_seed(fresh)
        saved_world_size = int(state.get("world_size", 1))
        if saved_world_size != self.world_size and self.is_main:
            warnings.warn(
                f"resuming a checkpoint written by {saved_world_size} process(es) with {self.world_size}: weights, "
                "optimizer and data position carry over; random streams of ranks the checkpoint lacks start fresh",
                stacklevel=3,
            )
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        saved_config = state["config"]
        current_config = self.config.to_dict()
        changed = sorted(
            key
            for key in current_config
            if key not in _RESUME_SAFE_FIELDS and json.dumps(saved_config.get(key)) != json.dumps(current_config[key])
        )
        if changed:
            warnings.warn(
                f"resuming with a config that differs from the checkpoint in {changed}; "
                "the run will not reproduce an uninterrupted one",
                stacklevel=3,
            )
        # A resumed run keeps the precision it resolved to (checkpoints from before "auto" trained as configured).
        saved_precision = state.get("precision", saved_config.get("precision", "bf16"))
        self.precision = self.config.precision if self.config.precision != "auto" else saved_precision
        # ... and, under "auto", its compile decision (compiled and eager steps differ in the last bits).
        self.compiled = bool(state.get("compiled", False))
        self.step = int(state["step"])
        self.sampler_state = state["sampler"]
        self.epoch = int(self.sampler_state["epoch"])
        self.position = int(self.sampler_state["position"])
        self.skipped = int(state["skipped"])
        self.train_seconds = float(state["train_seconds"])
        lr_lambdas = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": lr_lambdas})
        # The optimizer's moments carry over; its learning rates, weight decay and betas are this run's config's, as
        # the schedule's shape is, so that resuming with a lower lr (the non-finite-loss error's advice) takes effect.
        # With the config unchanged every value is the checkpoint's, to the bit.
        for group, configured in zip(self.optimizer.param_groups, self._configured_groups, strict=True):
            group.update(configured)
            group["lr"] = group["initial_lr"] * self.lr_factor(self.step)
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint, so the resumed log equals an uninterrupted one."""
        kept = []
        if self.log_path.exists():
            for line in self.log_path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line, cut short by the kill
                if record.get("step", 0) <= self.step:
                    kept.append(line + "\n")
        write_text_atomic(self.log_path, "".join(kept))
