"""The contrastive task: dual encoders (CLIP, SigLIP, FILIP, LiT, EVA-CLIP, NaViT) trained on image-text pairs.

    records --ImageTextDataset--> (pixels, ids) --collate--> batch --step--> loss (the model config's loss)

The task owns the BPE tokenizer fitted on the training captions (saved in the run folder, so a resumed run tokenizes
as the interrupted one did), the model built from the recipe's preset with a vocabulary sized to it, the input
adapter (``inputs``: "square" images at the preset's size, or NaViT's comparison at equal token slots per batch:
"pack", "resize_square", "pad_square"; see ``vlkit.tasks.navit``), and the evaluation: zero-shot classification
and retrieval on square test images whatever the input adapter (the same test sets for every recipe), with
confusion matrices and a retrieval grid in the report.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.data import shapes
from vlkit.data.digits import DIGIT_TEMPLATES, DIGIT_WORDS
from vlkit.data.images import BadSampleError
from vlkit.data.readers import (
    ImageTextDataset,
    ImageTextRecord,
    ResumableSampler,
    WebDatasetSource,
    collate_image_text,
)
from vlkit.data.shards import make_webdataset, webdataset_caption_sample
from vlkit.data.specs import DataSpec, Digits, ShapesScenes, image_text_records
from vlkit.data.transforms import ImageTransform
from vlkit.encoders import ViTConfig
from vlkit.eval.benchmarks import SHAPES_TEMPLATES, EvalSuite, digits_suite, shapes_suite
from vlkit.eval.result import EvalResult
from vlkit.losses import build_contrastive_loss, contrastive_loss_inputs
from vlkit.models import DualEncoder
from vlkit.models.base import build_model
from vlkit.registry import apply_overrides, get_config
from vlkit.tasks.base import RunContext, Task, TrainingInputs, WithHeads, register_task
from vlkit.text import Tokenizer, train_tokenizer
from vlkit.train import StepOutput, distributed, plot_confusion_matrix, plot_retrieval_grid

logger = logging.getLogger(__name__)

__all__ = ["Contrastive", "PatchLabels", "contrastive_step", "patch_labels", "patch_supervised_step"]


def contrastive_step(loss_fn: nn.Module) -> Callable[[nn.Module, dict[str, Any]], StepOutput]:
    def step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        return StepOutput(loss=loss_fn(**contrastive_loss_inputs(out)), metrics=_scale_metrics(out))

    return step


def _scale_metrics(out: Any) -> dict[str, float]:
    """The logged temperature (and SigLIP's bias) of a dual encoder's output."""
    metrics = {"logit_scale": float(out.logit_scale.detach())}
    if out.logit_bias is not None:
        metrics["logit_bias"] = float(out.logit_bias.detach())
    return metrics


@register_task
@dataclass(frozen=True)
class Contrastive(Task):
    """``inputs``: how images become tokens; ``pack_oversample`` x more samples than sequences per packed batch,
    each sequence as long as ``pack_sequence_slots`` square images; ``vocab_size`` of the fitted BPE.

    ``patch_loss``: the weight of a per-patch objective beside the contrastive one (0: none). Each patch token of
    the image tower classifies, through training-only heads (LayerNorm + linear each), the colour, shape and size
    of the object whose box holds the patch centre, or "background", and regresses that object's box: dense labels
    from the records' object boxes (ShapesWorld's manifests carry them; a user's JSONL may, as ``"objects":
    [{"colour", "shape", "size", "box": [x1, y1, x2, y2]}]`` beside ``"width"`` and ``"height"``). The contrastive
    loss pools the tower's tokens and never asks which token holds which object, yet a vision-language model's
    bridge reads exactly that (docs/experiments.md, "Where the binding fails"). SigLIP 2 adds a decoder loss (LocCa:
    captions, referring expressions, boxes) to its sigmoid loss for the same reason: dense, localised features.
    """

    name: ClassVar[str] = "contrastive"
    inputs: Literal["square", "pack", "resize_square", "pad_square"] = "square"
    pack_oversample: float = 1.0
    pack_sequence_slots: int = 1
    vocab_size: int = 512
    patch_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.inputs not in ("square", "pack", "resize_square", "pad_square"):
            raise ValueError(f"task.inputs must be square, pack, resize_square or pad_square; got {self.inputs!r}")
        if self.pack_oversample < 1.0:
            raise ValueError(f"task.pack_oversample must be >= 1, got {self.pack_oversample}")
        if self.pack_sequence_slots < 1:
            raise ValueError(f"task.pack_sequence_slots must be >= 1, got {self.pack_sequence_slots}")
        if self.patch_loss < 0.0:
            raise ValueError(f"task.patch_loss must be >= 0, got {self.patch_loss}")
        if self.patch_loss and self.inputs != "square":
            raise ValueError(f"task.patch_loss needs task.inputs='square' (each image on the tower's own grid), not "
                             f"{self.inputs!r}")  # fmt: skip

    # ---------------------------------------------------------------------------------------------- model

    def build_model(self, run: RunContext) -> DualEncoder:
        recipe = run.recipe
        records = self._records(run, run.training_data(recipe.stages[0]))
        if run.init is not None:
            model = _load_init_model(run)
            if model.tokenizer is None:
                logger.warning("--init %s has no tokenizer.json: fitting a new tokenizer on the training captions",
                               run.init)  # fmt: skip
                tokenizer = self._tokenizer(run, records, model.config.text.max_seq_len)
                if tokenizer.vocab_size > model.config.text.vocab_size:
                    raise ValueError(f"--init {run.init}: a new tokenizer's {tokenizer.vocab_size} tokens do not fit "
                                     f"the checkpoint's {model.config.text.vocab_size}-token embedding")  # fmt: skip
                model.tokenizer = tokenizer
            return model
        tokenizer = self._tokenizer(run, records, get_config(recipe.model).text.max_seq_len)
        overrides = {"text.vocab_size": tokenizer.vocab_size, **recipe.model_overrides}
        torch.manual_seed(recipe.stages[0].train.seed)
        model = build_model(apply_overrides(get_config(recipe.model), overrides))
        if not isinstance(model, DualEncoder):
            raise ValueError(f"recipe {recipe.name}: preset {recipe.model} builds a {type(model).__name__}, "
                             "but the contrastive task trains a dual encoder")  # fmt: skip
        model.tokenizer = tokenizer
        return model

    def _records(self, run: RunContext, spec: DataSpec) -> list[ImageTextRecord] | WebDatasetSource:
        """Rendered / read once per run and data spec (rank 0 renders first; see the runner)."""
        key = ("records", spec)
        if key not in run.state:
            skipped: list[BadSampleError] = []
            run.state[key] = image_text_records(spec, run.data_dir(), run.progress, skipped)
            run.state[("skipped", spec)] = len(skipped)
        return run.state[key]

    def _tokenizer(self, run: RunContext, records: Any, max_len: int) -> Tokenizer:
        saved = run.out_dir / "tokenizer.json"
        if saved.exists():
            return Tokenizer.from_file(saved, max_len=max_len)
        texts = _captions(records)
        if isinstance(run.recipe.data, Digits):
            texts += [template.format(word) for word in DIGIT_WORDS for template in DIGIT_TEMPLATES]
        elif isinstance(run.recipe.data, ShapesScenes):
            names = shapes.class_names(run.recipe.data.config)
            texts += [template.format(name) for name in names for template in SHAPES_TEMPLATES]
        tokenizer = train_tokenizer(texts, vocab_size=self.vocab_size, max_len=max_len)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(saved)
        return tokenizer

    # ---------------------------------------------------------------------------------------------- training

    def training_inputs(self, run: RunContext, stage: Any, model: nn.Module) -> TrainingInputs:
        inputs = self._training_inputs(run, stage, model)
        # The manifest lines its reader skipped (skip_bad) start the run's count of skipped items.
        return dataclasses.replace(inputs, skipped=run.state.get(("skipped", run.training_data(stage)), 0))

    def _training_inputs(self, run: RunContext, stage: Any, model: nn.Module) -> TrainingInputs:
        assert isinstance(model, DualEncoder) and model.tokenizer is not None
        records = self._records(run, run.training_data(stage))
        tokenizer, seed = model.tokenizer, stage.train.seed
        loss_fn = build_contrastive_loss(model.config.loss)
        text = {
            "pad_id": tokenizer.pad_token_id,
            "pad_left": tokenizer.padding_side == "left",
            "skip_bad": run.skip_bad,
        }
        sampler = _global_sampler
        if isinstance(records, WebDatasetSource):
            workers = max(1, stage.train.num_workers)
            if len(records.urls) < distributed.get_world_size() * workers:
                raise ValueError(f"{len(records.urls)} shards for {distributed.get_world_size()} ranks x {workers} "
                                 "loader workers: every worker needs at least one shard")  # fmt: skip
            if self.inputs != "square":
                raise ValueError(f"task.inputs {self.inputs!r} needs a manifest, not WebDataset shards")
            transform = ImageTransform(image_size=model.config.vision.image_size)
            dataset = make_webdataset(records.urls, transform, tokenizer.encode, tokenizer.max_len,
                                      shuffle_buffer=1000, seed=seed, **text)  # fmt: skip
            return TrainingInputs(dataset, collate_image_text, contrastive_step(loss_fn), stage.train.batch_size)
        if self.inputs == "square":
            transform = ImageTransform(image_size=model.config.vision.image_size)
            dataset = ImageTextDataset(records, transform, tokenizer.encode, tokenizer.max_len, seed=seed, **text)
            if self.patch_loss:
                return self._patch_supervised(run, model, records, dataset, loss_fn, stage.train.batch_size, sampler)
            return TrainingInputs(dataset, collate_image_text, contrastive_step(loss_fn), stage.train.batch_size,
                                  sampler)  # fmt: skip
        from vlkit.tasks.navit import MIN_PATCHES, input_policy

        vision = model.config.vision
        if not isinstance(vision, ViTConfig):
            raise ValueError(f"task.inputs {self.inputs!r} needs a ViT image tower, got {type(vision).__name__}")
        if stage.train.batch_size % self.pack_sequence_slots:
            raise ValueError(f"task.pack_sequence_slots {self.pack_sequence_slots} must divide the batch size "
                             f"{stage.train.batch_size}")  # fmt: skip
        rows, cols = vision.grid
        # Every rank packs its own slice of each micro-batch into its share of the sequences.
        replicas = distributed.get_world_size() * stage.train.grad_accum
        setup = input_policy(
            self.inputs, stage.train.local_micro_batch_size(distributed.get_world_size()),
            patch_size=vision.patch_size, max_patches=rows * cols, min_patches=min(MIN_PATCHES, rows * cols),
            oversample=self.pack_oversample, patch_dropout=vision.patch_dropout, seed=seed,
            seq_len=rows * cols * self.pack_sequence_slots
        )  # fmt: skip
        base = ImageTextDataset(records, setup.transform, tokenizer.encode, tokenizer.max_len, seed=seed, **text)
        return TrainingInputs(setup.wrap_dataset(base), setup.collate_fn, setup.step_fn(loss_fn),
                              setup.samples_per_batch * replicas, sampler)  # fmt: skip

    def _patch_supervised(
        self,
        run: RunContext,
        model: DualEncoder,
        records: list[ImageTextRecord],
        dataset: ImageTextDataset,
        loss_fn: nn.Module,
        batch_size: int,
        sampler: Callable[[int, int], torch.utils.data.Sampler[int]],
    ) -> TrainingInputs:
        vision = model.config.vision
        if not isinstance(vision, ViTConfig):
            raise ValueError(f"task.patch_loss needs a ViT image tower, got {type(vision).__name__}")
        if run.strategy == "fsdp" and distributed.get_world_size() > 1:
            raise ValueError("task.patch_loss trains a head beside the model: use --strategy ddp")
        labels = patch_labels(records, PATCH_ATTRIBUTES, dataset.transform, vision.grid)
        outputs = {**{attribute: len(names) for attribute, names in labels.classes.items()}, "box": 4}
        heads = nn.ModuleDict({name: nn.Sequential(nn.LayerNorm(vision.dim), nn.Linear(vision.dim, size))
                               for name, size in outputs.items()})  # fmt: skip
        module = WithHeads(model, heads, _forward_with_patch_heads)
        step = patch_supervised_step(loss_fn, labels, self.patch_loss)
        return TrainingInputs(dataset, collate_image_text, step, batch_size, sampler, module=module)

    # ---------------------------------------------------------------------------------------------- evaluation

    def evaluation(self, run: RunContext, model: nn.Module, stage: Any = None) -> Callable[[nn.Module], EvalResult]:
        assert isinstance(model, DualEncoder) and model.tokenizer is not None
        tokenizer = model.tokenizer
        transform = ImageTransform(image_size=model.config.vision.image_size)
        data = run.recipe.data
        if isinstance(data, ShapesScenes):
            square = dataclasses.replace(data.config, aspect_ratios=None)
            suite: EvalSuite = shapes_suite(square, transform, data.eval_size, data.eval_size, data.eval_split)
        elif isinstance(data, Digits):
            suite = digits_suite(transform)
        else:
            raise ValueError(f"recipe {run.recipe.name}: no contrastive evaluation for data kind {data.kind!r}")
        run.state["suite"] = suite
        return lambda m: suite(m, tokenizer)

    def report(self, run: RunContext, result: EvalResult, out_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
        suite: EvalSuite = run.state["suite"]
        figures = []
        for key, zero_shot_set in suite.zero_shot.items():
            details = result.artifacts.get(key)
            if details is None:
                continue
            path = out_dir / f"confusion_{key}.png"
            plot_confusion_matrix(details.confusion, zero_shot_set.class_names, path,
                                  f"{key}: true vs predicted class")  # fmt: skip
            figures.append((f"Confusion matrix, {key} (top-1 {details.top1:.1%}).", path))
        retrieval = result.artifacts.get("retrieval")
        if suite.retrieval is not None and retrieval is not None:
            rows = range(min(8, len(suite.retrieval.images)))
            top = retrieval.similarity.topk(3, dim=1).indices
            captions = [[(suite.retrieval.texts[j], suite.retrieval.text_to_image[j] == i) for j in top[i].tolist()]
                        for i in rows]  # fmt: skip
            path = out_dir / "retrieval.png"
            plot_retrieval_grid([suite.retrieval.images[i] for i in rows], [f"image {i}" for i in rows], captions,
                                path)  # fmt: skip
            figures.append(("Image -> text retrieval: the top 3 captions for test scenes (green = correct).", path))
        return figures, []


PATCH_ATTRIBUTES = ("colour", "shape", "size")
BACKGROUND = "background"


@dataclass
class PatchLabels:
    """``targets`` (records, attributes, patches): per record and attribute, each patch's class index (raster order);
    ``classes``: per attribute, its class names, ``BACKGROUND`` first; ``boxes`` (records, patches, 4): the box
    (x1, y1, x2, y2) of the patch's object in the transformed image, as fractions of its width and height (NaN on
    background)."""

    targets: torch.Tensor
    classes: dict[str, list[str]]
    boxes: torch.Tensor


def patch_labels(
    records: list[ImageTextRecord], attributes: tuple[str, ...], transform: ImageTransform, grid: tuple[int, int]
) -> PatchLabels:
    """The dense labels ``Contrastive.patch_loss`` trains on: a patch takes the attributes of the object whose box
    holds its centre (the last such object, drawn on top), else ``BACKGROUND``. Patch centres are mapped back
    through ``transform``'s resize and crop to the record's ``width`` x ``height``, where its boxes live."""
    if transform.resize_mode != "shortest_crop":
        raise ValueError(f"patch labels follow the 'shortest_crop' transform, not {transform.resize_mode!r}")
    values: dict[str, set[str]] = {attribute: set() for attribute in attributes}
    for record in records:
        objects = record.meta.get("objects")
        if objects is None or "width" not in record.meta or "height" not in record.meta:
            raise ValueError(f"{record.item}: task.patch_loss needs each record's 'objects' with their boxes and the "
                             "image's 'width' and 'height'")  # fmt: skip
        for item in objects:
            for attribute in attributes:
                if attribute not in item or "box" not in item:
                    raise ValueError(f"{record.item}: an object without a {attribute!r} or 'box': {item}")
                values[attribute].add(str(item[attribute]))
    classes = {attribute: [BACKGROUND, *sorted(names)] for attribute, names in values.items()}
    index = {attribute: {name: i for i, name in enumerate(names)} for attribute, names in classes.items()}
    (rows, columns), (height, width) = grid, transform.size
    targets = torch.zeros(len(records), len(attributes), rows * columns, dtype=torch.long)
    boxes = torch.full((len(records), rows * columns, 4), float("nan"))
    sides = torch.tensor([width, height, width, height], dtype=torch.float32)
    patch = torch.arange(rows * columns, dtype=torch.float64)
    centre_x, centre_y = (patch % columns + 0.5) * width / columns, (patch // columns + 0.5) * height / rows
    for r, record in enumerate(records):
        image_width, image_height = int(record.meta["width"]), int(record.meta["height"])
        # The transform scales both sides by one factor so the image covers the target, then centre-crops.
        scale = max(height / image_height, width / image_width)
        left, top = (image_width * scale - width) / 2, (image_height * scale - height) / 2
        x, y = (centre_x + left) / scale, (centre_y + top) / scale  # patch centres in the record's image
        for item in record.meta["objects"]:  # in drawing order: an object on top takes the patches it covers
            x1, y1, x2, y2 = item["box"]
            inside = (x1 <= x) & (x < x2) & (y1 <= y) & (y < y2)
            for a, attribute in enumerate(attributes):
                targets[r, a, inside] = index[attribute][str(item[attribute])]
            corners = torch.tensor([x1 * scale - left, y1 * scale - top, x2 * scale - left, y2 * scale - top])
            boxes[r, inside] = (corners / sides).clamp(0.0, 1.0)
    return PatchLabels(targets, classes, boxes)


def _forward_with_patch_heads(
    model: nn.Module, heads: nn.Module, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[Any, dict[str, torch.Tensor]]:
    out = model(pixels, input_ids, attention_mask, output_patch_tokens=True)
    return out, {name: head(out.patch_tokens) for name, head in heads.items()}


def patch_supervised_step(
    loss_fn: nn.Module, labels: PatchLabels, weight: float
) -> Callable[[nn.Module, dict[str, Any]], StepOutput]:
    """The contrastive loss + ``weight`` x the patch loss, on a ``WithHeads`` module whose heads are one per
    attribute and ``"box"``. The patch loss: per attribute, the cross-entropy over all patches; plus, on the patches
    that hold an object, the L1 distance (summed over x1, y1, x2, y2) between the box head's output and the object's
    box, so that a token holds where its object ends as well as what it is (what grounding asks). Logs both losses,
    each attribute's accuracy and the box error (per coordinate, a fraction of the image side) on object patches."""

    def step(module: nn.Module, batch: dict[str, Any]) -> StepOutput:
        out, predicted = module(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        contrastive = loss_fn(**contrastive_loss_inputs(out))
        device = out.patch_tokens.device
        targets, boxes = labels.targets[batch["index"]].to(device), labels.boxes[batch["index"]].to(device)
        metrics = {**_scale_metrics(out), "contrastive_loss": float(contrastive.detach())}
        dense = contrastive.new_zeros(())
        on_object = ~boxes[..., 0].isnan()  # (B, N); background fills most patches: the metrics score the objects'
        for a, attribute in enumerate(labels.classes):
            scores = predicted[attribute]  # (B, N, classes)
            dense = dense + F.cross_entropy(scores.flatten(0, 1).float(), targets[:, a].flatten())
            hits = (scores.argmax(-1) == targets[:, a])[on_object]
            metrics[f"patch_{attribute}_accuracy"] = float(hits.float().mean()) if hits.numel() else 0.0
        if on_object.any():
            error = (predicted["box"][on_object].float() - boxes[on_object]).abs()  # (objects' patches, 4)
            dense = dense + error.sum(-1).mean()
            metrics["patch_box_error"] = float(error.detach().mean())
        metrics["patch_loss"] = float(dense.detach())
        return StepOutput(loss=contrastive + weight * dense, metrics=metrics)

    return step


def _global_sampler(length: int, seed: int) -> torch.utils.data.Sampler[int]:
    # The global order; the trainer hands each rank its slice of every global micro-batch.
    return ResumableSampler(range(length), seed=seed)


def _captions(records: list[ImageTextRecord] | WebDatasetSource, limit: int = 20_000) -> list[str]:
    if isinstance(records, WebDatasetSource):
        return webdataset_caption_sample(records.urls, limit)
    return [caption for record in records[:limit] for caption in record.captions]


def _load_init_model(run: RunContext) -> DualEncoder:
    """``--init``: a vlkit or Hugging Face directory, with its own architecture and tokenizer."""
    from vlkit.hub import from_pretrained

    model = from_pretrained(run.init)
    if not isinstance(model, DualEncoder):
        raise ValueError(f"--init {run.init}: a {type(model).__name__}, but the contrastive task trains a dual "
                         "encoder")  # fmt: skip
    if run.recipe.model_overrides:
        logger.warning("--init %s: the architecture comes from the checkpoint; ignoring %s", run.init,
                       sorted(run.recipe.model_overrides))  # fmt: skip
    return model
