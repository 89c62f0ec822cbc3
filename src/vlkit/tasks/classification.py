"""The classification task: ShapesWorld colour + shape classification (the tower LiT locks, EVA-CLIP starts from).

LiT (Zhai et al., 2022) tunes a text tower against a *pretrained, locked* image tower, and EVA-CLIP (Sun et al.,
2023) starts its image tower from pretrained weights; on ShapesWorld both need a tower trained first, which this
recipe provides: ``ImageClassifier`` (the ``shapes_clip`` image tower + a linear head) on one-object scenes.

pixels (B, 3, 64, 64) -> ViT -> pooled (B, D) -> logits (B, C + S): C colour logits, then S shape logits.

The label set is *factorised* (colour and shape, one softmax each) rather than the C x S combinations: the held-out
combinations never occur in training, so a joint softmax could never predict them (its held-out top-1 is 0 by
construction), while two attribute heads can, and their held-out accuracy measures what the compositional split is
for: whether the tower represents colour and shape separably. The predicted class is (argmax colour, argmax shape),
the argmax over the C x S combinations of the summed log-probabilities, so ``top1`` is the usual combination top-1.

It trains on ``ShapesObjects`` data (one-object scenes rendered on demand, a fraction shown colourless).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlkit.data import shapes
from vlkit.data.specs import ShapesObjects
from vlkit.data.transforms import ImageTransform
from vlkit.eval.result import EvalResult
from vlkit.models import ImageClassifier
from vlkit.models.base import build_model
from vlkit.registry import apply_overrides, get_config
from vlkit.tasks.base import RunContext, Task, TrainingInputs, register_task
from vlkit.train import StepOutput, plot_confusion_matrix

__all__ = [
    "NO_COLOUR",
    "Classification",
    "ClassificationEval",
    "ShapesClassificationDataset",
    "attribute_names",
    "classification_step",
]


def attribute_names(config: shapes.ShapesConfig) -> tuple[str, ...]:
    """The classifier's output names: the colours, then the shapes."""
    return (*config.colours, *config.shapes)


NO_COLOUR = -100  # cross_entropy's ignore_index: a colourless copy teaches shape only


class ShapesClassificationDataset(Dataset):
    """One-object ShapesWorld scenes of a split as ``{"pixels", "colour", "shape"}``, rendered on demand.

    ``colourless_fraction`` of the scenes (chosen by a seeded hash of the index) have their object repainted in a
    random grey (``shapes.colourless_copy``) and colour label ``NO_COLOUR``: on those, shape is the only thing to
    learn, so the shape head cannot lean on colour alone (each colour lacks one shape in training, and a shape head
    that learned "red is never a circle" gets every held-out combination wrong).
    """

    def __init__(
        self,
        config: shapes.ShapesConfig,
        split: shapes.Split,
        size: int,
        transform: ImageTransform,
        colourless_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= colourless_fraction < 1.0:
            raise ValueError(f"colourless_fraction must be in [0, 1), got {colourless_fraction}")
        self.scenes = shapes.ShapesDataset(config, split, size, single_object=True)
        self.config = config
        self.transform = transform
        self.colourless_fraction = colourless_fraction
        self.seed = seed

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.scenes[index]
        item = sample.objects[0]
        image, colour = sample.image, self.config.colours.index(item.colour)
        if self.colourless_fraction:
            draw = np.random.default_rng((self.seed, index)).random(2)
            if draw[0] < self.colourless_fraction:
                low, high = shapes.GREY_LEVELS
                image, colour = shapes.colourless_copy(sample, round(low + draw[1] * (high - low))).image, NO_COLOUR
        return {
            "pixels": self.transform(image),  # (3, H, W)
            "colour": torch.tensor(colour),
            "shape": torch.tensor(self.config.shapes.index(item.shape)),
        }


def _split_logits(logits: Tensor, num_colours: int) -> tuple[Tensor, Tensor]:
    logits = logits.float()  # cross-entropy and argmax in fp32 under bf16 autocast
    return logits[:, :num_colours], logits[:, num_colours:]  # (B, C), (B, S)


def classification_step(num_colours: int):
    def step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        colour_logits, shape_logits = _split_logits(model(batch["pixels"]), num_colours)
        coloured = batch["colour"] != NO_COLOUR
        # Summed over the coloured rows, divided by at least one: a batch of colourless copies alone has no colour loss.
        colour_loss = F.cross_entropy(colour_logits, batch["colour"], ignore_index=NO_COLOUR, reduction="sum")
        colour_loss = colour_loss / coloured.sum().clamp_min(1)
        shape_loss = F.cross_entropy(shape_logits, batch["shape"])
        correct = (colour_logits.argmax(1) == batch["colour"]) & (shape_logits.argmax(1) == batch["shape"])
        correct = correct[coloured]
        metrics = {
            "colour_loss": float(colour_loss.detach()),
            "shape_loss": float(shape_loss.detach()),
        }
        if len(correct):
            metrics["train_top1"] = float(correct.float().mean())
        return StepOutput(loss=colour_loss + shape_loss, metrics=metrics)

    return step


@dataclass
class _EvalSplit:
    pixels: Tensor  # (N, 3, H, W)
    colours: Tensor  # (N,)
    shapes: Tensor  # (N,)


@dataclass
class ClassificationEval:
    """Top-1 on seen-combination (``test``) and held-out-combination (``test_heldout``) one-object scenes (or on
    ``val`` and ``val_heldout``: ``shapes.eval_splits``).

    Sets are rendered once; each call returns the shape confusion matrix of every split as an artifact.
    """

    num_colours: int
    splits: dict[str, _EvalSplit]
    batch_size: int = 256

    @classmethod
    def build(
        cls, config: shapes.ShapesConfig, transform: ImageTransform, size: int, which: str = "test"
    ) -> ClassificationEval:
        splits = {}
        for split in shapes.eval_splits(config, which):
            key = "_heldout" if shapes.is_heldout(split) else ""
            dataset = ShapesClassificationDataset(config, split, size, transform)
            items = [dataset[index] for index in range(size)]
            splits[key] = _EvalSplit(
                *(torch.stack([item[name] for item in items]) for name in ("pixels", "colour", "shape"))
            )
        return cls(len(config.colours), splits)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> EvalResult:
        device = next(model.parameters()).device
        metrics: dict[str, float] = {}
        confusions: dict[str, np.ndarray] = {}
        for suffix, split in self.splits.items():
            logits = torch.cat(
                [model(pixels.to(device)).float().cpu() for pixels in split.pixels.split(self.batch_size)]
            )
            colour_logits, shape_logits = _split_logits(logits, self.num_colours)
            colour_right = colour_logits.argmax(1) == split.colours
            shape_predictions = shape_logits.argmax(1)
            shape_right = shape_predictions == split.shapes
            metrics[f"top1{suffix}"] = float((colour_right & shape_right).float().mean())
            metrics[f"colour_top1{suffix}"] = float(colour_right.float().mean())
            metrics[f"shape_top1{suffix}"] = float(shape_right.float().mean())
            num_shapes = shape_logits.shape[1]
            confusion = np.zeros((num_shapes, num_shapes), dtype=np.int64)
            np.add.at(confusion, (split.shapes.numpy(), shape_predictions.numpy()), 1)
            confusions[f"confusion{suffix}"] = confusion
        return EvalResult(metrics, confusions)


@register_task
@dataclass(frozen=True)
class Classification(Task):
    """Trains an ``ImageClassifier`` preset with one output per colour and per shape on ``ShapesObjects`` data."""

    name: ClassVar[str] = "classification"

    def build_model(self, run: RunContext) -> ImageClassifier:
        recipe, data = run.recipe, _objects(run)
        if run.init is not None:
            raise ValueError(f"recipe {recipe.name} trains a classifier from scratch; --init applies to other tasks")
        names = attribute_names(data.config)
        overrides = {"num_classes": len(names), "class_names": names, **recipe.model_overrides}
        torch.manual_seed(recipe.stages[0].train.seed)
        model = build_model(apply_overrides(get_config(recipe.model), overrides))
        if not isinstance(model, ImageClassifier):
            raise ValueError(f"recipe {recipe.name}: preset {recipe.model} builds a {type(model).__name__}, "
                             "not a classifier")  # fmt: skip
        return model

    def training_inputs(self, run: RunContext, stage: Any, model: nn.Module) -> TrainingInputs:
        data = _objects(run, stage)
        transform = ImageTransform(image_size=model.config.vision.image_size)
        dataset = ShapesClassificationDataset(data.config, "train", data.train_size, transform,
                                              data.colourless_fraction, seed=stage.train.seed)  # fmt: skip
        return TrainingInputs(dataset, None, classification_step(len(data.config.colours)), stage.train.batch_size)

    def evaluation(self, run: RunContext, model: nn.Module, stage: Any = None) -> Callable[[nn.Module], EvalResult]:
        data = _objects(run)
        return ClassificationEval.build(data.config, ImageTransform(image_size=model.config.vision.image_size),
                                        data.eval_size, data.eval_split)  # fmt: skip

    def report(self, run: RunContext, result: EvalResult, out_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
        data = _objects(run)
        shape_names = list(data.config.shapes)
        figures = []
        for split_name in shapes.eval_splits(data.config, data.eval_split):
            suffix = "_heldout" if shapes.is_heldout(split_name) else ""
            confusion = result.artifacts.get(f"confusion{suffix}")
            if confusion is None:
                continue
            path = out_dir / f"confusion_shape{suffix}.png"
            plot_confusion_matrix(confusion, shape_names, path, f"{split_name}: true vs predicted shape")
            top1 = result.metrics[f"shape_top1{suffix}"]
            figures.append((f"Shape confusion on {split_name} (shape top-1 {top1:.1%}).", path))
        notes = [
            "Factorised labels: one softmax over colours, one over shapes; top1 needs both right. Held-out colour "
            "x shape combinations never occur in training, so top1_heldout measures attribute binding."
        ]
        return figures, notes


def _objects(run: RunContext, stage: Any | None = None) -> ShapesObjects:
    data = run.recipe.data if stage is None else run.training_data(stage)
    if not isinstance(data, ShapesObjects):
        raise ValueError(f"recipe {run.recipe.name}: the classification task trains on ShapesObjects data, not "
                         f"{data.kind!r}")  # fmt: skip
    return data
