"""What a kind of training means: the ``Task`` interface every recipe stage runs through, and the task registry.

A task owns what differs between kinds of training — how the model is built, how a batch becomes a loss (its input
adapter and step), how the model is evaluated (metrics *and* artifacts: confusion matrices, retrieval results,
later sample answers and boxes) and what the report shows — so that the runner (``vlkit.recipes.run``) is one loop
over stages with the one trainer and no per-task branch.

A task is a frozen dataclass: its fields are the task's options (e.g. the contrastive task's input policy), so a
recipe declares ``task=Contrastive(inputs="pack")`` and ``--set task.inputs=pack`` changes it like any other field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlkit.data.specs import DataSpec, Manifest
from vlkit.eval.result import EvalResult
from vlkit.train import StepOutput

if TYPE_CHECKING:
    from vlkit.recipes.base import Recipe, Stage
    from vlkit.train.distributed import Strategy

__all__ = [
    "EvalResult",
    "RunContext",
    "Task",
    "TrainingInputs",
    "WithHeads",
    "get_task",
    "register_task",
    "task_from_dict",
]

StepFn = Callable[[nn.Module, dict[str, Any]], StepOutput]
_TASKS: dict[str, type[Task]] = {}


@dataclass
class RunContext:
    """What a run knows besides its recipe: where it writes, and the user's run options.

    ``train_data`` (``--train-data``) replaces the training data of the stages that use the recipe's data;
    evaluation always uses the recipe's own data. ``init`` (``--init``) is a model directory the task loads
    instead of building the preset. ``state`` is where a task keeps what it prepared once per run (a fitted
    tokenizer, rendered data) for its later stages.
    """

    recipe: Recipe
    out_dir: Path
    train_data: str | None = None
    skip_bad: bool = False
    init: str | None = None
    progress: bool = True
    strategy: Strategy = "ddp"
    device: torch.device | str = "cpu"
    report: bool = True
    state: dict[str, Any] = field(default_factory=dict)

    def data_dir(self, name: str = "data") -> Path:
        return self.out_dir / name

    def training_data(self, stage: Stage) -> DataSpec:
        """The stage's data: its own, else ``--train-data`` when given, else the recipe's."""
        if stage.data is not None:
            return stage.data
        if self.train_data is not None:
            return Manifest(self.train_data, skip_bad=self.skip_bad)
        return self.recipe.data


@dataclass
class TrainingInputs:
    """A stage's dataset, its collate and step functions, and the global samples per optimizer step (a packed
    batch draws more samples than it has sequences)."""

    dataset: torch.utils.data.Dataset
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None
    step_fn: StepFn
    batch_size: int
    sampler_factory: Callable[[int, int], torch.utils.data.Sampler[int]] | None = None
    # What the trainer trains when the stage adds training-only parts (an auxiliary head) to the model: a
    # ``WithHeads`` around it. The model itself is what the run saves.
    module: nn.Module | None = None
    # Items the data's reader skipped before training (``--skip-bad``: malformed manifest lines, conversations that
    # cannot be used); the run's skipped count starts from them.
    skipped: int = 0


class WithHeads(nn.Module):
    """``model`` plus training-only ``heads``, one module for the trainer: the model's parameters keep their own
    names (so a stage's freeze / lr rules and the checkpoints read as without the heads) beside ``heads.*``; any
    other attribute (``config``, ``tokenizer``, ``encode_image``...) is the model's, so evaluation runs on it as on the
    model. ``forward(*args)`` is ``forward_fn(model, heads, *args)``: one call, as DDP's gradient hooks need."""

    def __init__(
        self, model: nn.Module, heads: nn.Module, forward_fn: Callable[[nn.Module, nn.Module, Any], Any]
    ) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        if hasattr(model, "heads"):
            raise ValueError(f"{type(model).__name__} has its own 'heads'; name the training heads otherwise")
        self.heads = heads
        object.__setattr__(self, "model", model)  # not a child: its modules are registered above, under their names
        object.__setattr__(self, "forward_fn", forward_fn)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_fn(self.model, self.heads, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "model" not in self.__dict__:  # still registering the model's parts
                raise
            return getattr(self.__dict__["model"], name)


class Task:
    """The interface; subclasses are frozen dataclasses registered with ``register_task``."""

    name: ClassVar[str]

    def build_model(self, run: RunContext) -> nn.Module:
        """The model the recipe trains, with fresh (seeded) weights or from ``run.init``; called once per run."""
        raise NotImplementedError

    def training_inputs(self, run: RunContext, stage: Stage, model: nn.Module) -> TrainingInputs:
        raise NotImplementedError

    def evaluation(
        self, run: RunContext, model: nn.Module, stage: Stage | None = None
    ) -> Callable[[nn.Module], EvalResult] | None:
        """Built once per stage (test sets rendered up front) and called at every periodic evaluation; ``stage`` is
        the stage being trained (None: the recipe's finished model), for a task whose stages learn different things
        from different data (the vlm task's text stages)."""
        return None

    def report(self, run: RunContext, result: EvalResult, out_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
        """The report's figures (caption, png) drawn from ``result``'s artifacts into ``out_dir``, and notes."""
        return [], []

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    _load()
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def task_from_dict(data: dict[str, Any]) -> Task:
    options = {key: value for key, value in data.items() if key != "name"}
    return get_task(data["name"])(**options)


def _load() -> None:
    import vlkit.tasks.classification
    import vlkit.tasks.contrastive
    import vlkit.tasks.qformer
    import vlkit.tasks.vlm  # noqa: F401
