"""Run a recipe end to end: data -> tokenizer -> model -> trainer -> evaluation -> model directory + report.

Outputs (the contract other parts rely on): ``out/metrics.json``, ``out/log.jsonl``, ``out/report.html``,
checkpoints under ``out/checkpoints``, and the final model in ``out/model`` (loadable with ``vlkit.from_pretrained``).

What a recipe declares, this module wires, one mechanism per field rather than a case per recipe:
``image_init`` (a model directory, or ``"recipe:NAME"`` trained into ``out/pretrain`` first) starts the image tower
(LiT, EVA-CLIP); ``lock`` and ``image_layer_decay`` / ``text_layer_decay`` become parameter-group rules;
``input_policy`` picks the dataset, collate and step (``training_inputs``: square images, or NaViT's packing and its
square baselines), and a packed run's ``metrics.json`` adds ``padding_fraction`` (the mean over its steps).
``run_any_recipe`` trains a classification recipe (``classify_shapes``) with ``run_classification`` instead.

Under torchrun every rank calls ``run_recipe``: rank 0 renders the data and fits the tokenizer first and the other
ranks then read its files; all ranks train (``strategy`` "ddp" or "fsdp") and evaluate; only rank 0 writes the
outputs above (an FSDP model is gathered to rank 0 as one ordinary single-file vlkit model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlkit.data import shapes
from vlkit.data.readers import (
    ImageTextDataset,
    ImageTextRecord,
    ReadResult,
    ResumableSampler,
    WebDatasetSource,
    collate_image_text,
    make_webdataset,
    read_records,
    webdataset_caption_sample,
)
from vlkit.data.transforms import ImageTransform
from vlkit.encoders import ViTConfig
from vlkit.eval.benchmarks import (
    DIGIT_TEMPLATES,
    DIGIT_WORDS,
    SHAPES_TEMPLATES,
    EvalSuite,
    digits_split,
    digits_suite,
    shapes_suite,
)
from vlkit.losses import build_contrastive_loss, contrastive_loss_inputs
from vlkit.models import DualEncoder
from vlkit.models.base import build_model
from vlkit.models.classifier import ImageClassifierConfig
from vlkit.recipes.base import Recipe, get_recipe
from vlkit.recipes.classification import (
    TRAINING_ONLY_VISION,
    ClassificationResult,
    init_image_tower,
    run_classification,
)
from vlkit.registry import apply_overrides, get_config
from vlkit.text import Tokenizer, train_tokenizer
from vlkit.train import StepOutput, Trainer, distributed, plot_confusion_matrix, plot_retrieval_grid, write_report
from vlkit.train.distributed import Strategy

logger = logging.getLogger(__name__)

StepFn = Callable[[torch.nn.Module, dict[str, Any]], StepOutput]


@dataclass
class RunResult:
    """``model`` is the trained plain model on rank 0; on other ranks of an FSDP run it is their sharded module."""

    metrics: dict[str, Any]
    out_dir: Path
    model: DualEncoder


def _shapes_records(recipe: Recipe, data_dir: Path, progress: bool) -> list[ImageTextRecord]:
    """Render the recipe's ShapesWorld training split (and its colourless copies) once; later runs with the same
    settings reuse it."""
    config_file = data_dir / "shapes_config.json"
    copies = round(recipe.colourless_copies * recipe.train_size)
    wanted = {**recipe.shapes.to_dict(), "sizes": {"train": recipe.train_size}, "colourless_copies": copies}
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as the file reads back
    if not (config_file.exists() and json.loads(config_file.read_text()) == wanted):
        shapes.write_shapes(data_dir, recipe.shapes, {"train": recipe.train_size}, progress=progress)
        _write_colourless_copies(recipe.shapes, data_dir, copies, progress)
        config_file.write_text(json.dumps(wanted, indent=2, sort_keys=True))
    records = []
    for manifest in ("train.jsonl", "train_colourless.jsonl"):
        if (data_dir / manifest).exists():
            result = read_records(data_dir / manifest)
            assert isinstance(result, ReadResult)
            records += result.records
    return records


def _write_colourless_copies(config: shapes.ShapesConfig, data_dir: Path, count: int, progress: bool) -> None:
    """Colourless copies of train scenes 0..count-1 (images/train_colourless, train_colourless.jsonl)."""
    manifest = data_dir / "train_colourless.jsonl"
    manifest.unlink(missing_ok=True)
    if not count:
        return
    (data_dir / "images" / "train_colourless").mkdir(parents=True, exist_ok=True)
    low, high = shapes.GREY_LEVELS
    with manifest.open("w", encoding="utf-8") as handle:
        for index in tqdm(range(count), desc="colourless copies", disable=not progress, leave=False):
            grey = int(np.random.default_rng((config.seed, index, 1)).integers(low, high + 1))
            copy = shapes.colourless_copy(shapes.generate(config, "train", index), grey)
            relative = f"images/train_colourless/{index:06d}.png"
            copy.image.save(data_dir / relative)
            handle.write(json.dumps({"image": relative, **copy.to_record()}) + "\n")


def _digits_records(data_dir: Path) -> list[ImageTextRecord]:
    images, labels = digits_split("train")
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = data_dir / "images" / f"{index:05d}.png"
        if not path.exists():
            image.save(path)
        word = DIGIT_WORDS[int(label)]
        captions = [template.format(word) for template in DIGIT_TEMPLATES] + [f"a {word}.", f"the digit {label}."]
        records.append(ImageTextRecord(str(path), captions, f"digits:{index}"))
    return records


def training_records(
    recipe: Recipe, out_dir: Path, train_data: str | None, skip_bad: bool, progress: bool
) -> list[ImageTextRecord] | WebDatasetSource:
    if train_data is not None:
        result = read_records(train_data, skip_bad=skip_bad)
        if isinstance(result, WebDatasetSource):
            return result
        if not result.records:
            raise ValueError(f"{train_data}: no usable records")
        return result.records
    if recipe.data == "digits":
        return _digits_records(out_dir / "data")
    return _shapes_records(recipe, out_dir / "data", progress)


def _captions(records: list[ImageTextRecord] | WebDatasetSource, limit: int = 20_000) -> list[str]:
    if isinstance(records, WebDatasetSource):
        return webdataset_caption_sample(records.urls, limit)
    return [caption for record in records[:limit] for caption in record.captions]


def build_tokenizer(recipe: Recipe, captions: list[str], out_dir: Path, max_len: int) -> Tokenizer:
    """A BPE fitted on the training captions and the evaluation prompts, saved in the run folder so a resumed
    run tokenizes exactly as the interrupted one did."""
    saved = out_dir / "tokenizer.json"
    if saved.exists():
        return Tokenizer.from_file(saved, max_len=max_len)
    texts = list(captions)
    if recipe.data == "shapes":
        names = shapes.class_names(recipe.shapes)
        texts += [template.format(name) for name in names for template in SHAPES_TEMPLATES]
    else:
        texts += [template.format(word) for word in DIGIT_WORDS for template in DIGIT_TEMPLATES]
    tokenizer = train_tokenizer(texts, vocab_size=recipe.tokenizer_vocab_size, max_len=max_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(saved)
    return tokenizer


def load_init_model(recipe: Recipe, init: str) -> DualEncoder:
    """The dual encoder to fine-tune: a vlkit or Hugging Face directory (its own architecture and tokenizer)."""
    from vlkit.hub import from_pretrained

    model = from_pretrained(init)
    if not isinstance(model, DualEncoder):
        raise ValueError(f"--init {init}: a {type(model).__name__}, but recipe {recipe.name} trains a dual encoder")
    if recipe.model_overrides:
        logger.warning("--init %s: the architecture comes from the checkpoint; ignoring %s", init,
                       sorted(recipe.model_overrides))  # fmt: skip
    return model


def build_recipe_model(recipe: Recipe, tokenizer: Tokenizer) -> DualEncoder:
    """The recipe's preset with its overrides and a vocabulary sized to the tokenizer, seeded by the recipe."""
    overrides = {"text.vocab_size": tokenizer.vocab_size, **recipe.model_overrides}
    torch.manual_seed(recipe.train.seed)
    model = build_model(apply_overrides(get_config(recipe.model), overrides))
    assert isinstance(model, DualEncoder)
    return model


def contrastive_step(loss_fn: torch.nn.Module):
    def step(model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        loss = loss_fn(**contrastive_loss_inputs(out))
        metrics = {"logit_scale": float(out.logit_scale.detach())}
        if out.logit_bias is not None:
            metrics["logit_bias"] = float(out.logit_bias.detach())
        return StepOutput(loss=loss, metrics=metrics)

    return step


def _prepare(
    recipe: Recipe, out_dir: Path, train_data: str | None, skip_bad: bool, init: str | None, progress: bool
) -> tuple[list[ImageTextRecord] | WebDatasetSource, Tokenizer, DualEncoder]:
    """The training records, the tokenizer and the model to train (the same on every rank)."""
    records = training_records(recipe, out_dir, train_data, skip_bad, progress)
    if init is not None:
        model = load_init_model(recipe, init)
        if model.tokenizer is None:
            logger.warning("--init %s has no tokenizer.json: fitting a new tokenizer on the training captions", init)
            tokenizer = build_tokenizer(recipe, _captions(records), out_dir, model.config.text.max_seq_len)
            if tokenizer.vocab_size > model.config.text.vocab_size:
                raise ValueError(f"--init {init}: a new tokenizer's {tokenizer.vocab_size} tokens do not fit the "
                                 f"checkpoint's {model.config.text.vocab_size}-token embedding")  # fmt: skip
        else:
            tokenizer = model.tokenizer
    else:
        max_len = get_config(recipe.model).text.max_seq_len
        tokenizer = build_tokenizer(recipe, _captions(records), out_dir, max_len)
        model = build_recipe_model(recipe, tokenizer)
    if recipe.image_init is not None:
        if init is not None:
            raise ValueError(f"recipe {recipe.name} starts its image tower from {recipe.image_init!r}; --init would "
                             "replace it: pass --set image_init=null to start from --init alone")  # fmt: skip
        init_image_tower(model, resolve_image_init(recipe, out_dir, progress))
    model.tokenizer = tokenizer
    return records, tokenizer, model


def resolve_image_init(recipe: Recipe, out_dir: Path, progress: bool = False) -> Path:
    """The model directory ``recipe.image_init`` names; ``"recipe:NAME"`` is trained into ``out_dir/pretrain`` first
    (unless a finished run is there), with this recipe's vision architecture and ``image_init_overrides``."""
    assert recipe.image_init is not None
    if not recipe.image_init.startswith("recipe:"):
        return Path(recipe.image_init)
    pretrain_dir = out_dir / "pretrain"
    if not (pretrain_dir / "metrics.json").exists():
        vision = {
            f"model.{key}": value
            for key, value in recipe.model_overrides.items()
            if key.startswith("vision.") and key.removeprefix("vision.") not in TRAINING_ONLY_VISION
        }
        pretrain = get_recipe(recipe.image_init.removeprefix("recipe:"))
        logger.info("recipe %s: training its image tower with recipe %s in %s", recipe.name, pretrain.name,
                    pretrain_dir)  # fmt: skip
        run_any_recipe(pretrain.with_overrides({**vision, **recipe.image_init_overrides}), pretrain_dir,
                       resume=True, progress=progress)  # fmt: skip
    return pretrain_dir / "model"


@dataclass
class TrainingInputs:
    """What the input policy decides: the dataset, its collate and step functions, and the global samples per
    optimizer step (a packed batch draws more samples than it has sequences)."""

    dataset: torch.utils.data.Dataset
    collate_fn: Callable[[list[Any]], dict[str, Any]]
    step_fn: StepFn
    batch_size: int


def training_inputs(
    recipe: Recipe,
    model: DualEncoder,
    records: list[ImageTextRecord] | WebDatasetSource,
    tokenizer: Tokenizer,
    loss_fn: torch.nn.Module,
    skip_bad: bool,
) -> TrainingInputs:
    """The dataset, collate, step and batch size of ``recipe.input_policy``.

    "square": every image resized to the model's square ``image_size``. "pack" / "resize_square" / "pad_square":
    NaViT's comparison (``vlkit.recipes.navit.input_policy``) with the model's patch grid as the token budget per
    sequence and ``train.batch_size`` sequences per batch, so every policy fills the same token slots.
    """
    text = {"pad_id": tokenizer.pad_token_id, "skip_bad": skip_bad}
    if recipe.input_policy == "square":
        transform = ImageTransform(image_size=model.config.vision.image_size)
        if isinstance(records, WebDatasetSource):
            dataset: torch.utils.data.Dataset = make_webdataset(
                records.urls, transform, tokenizer.encode, tokenizer.max_len, shuffle_buffer=1000,
                seed=recipe.train.seed, **text,
            )  # fmt: skip
        else:
            dataset = ImageTextDataset(records, transform, tokenizer.encode, tokenizer.max_len, seed=recipe.train.seed,
                                       **text)  # fmt: skip
        return TrainingInputs(dataset, collate_image_text, contrastive_step(loss_fn), recipe.train.batch_size)
    if isinstance(records, WebDatasetSource):
        raise ValueError(f"recipe {recipe.name}: input_policy {recipe.input_policy!r} needs a manifest, not shards")
    # Imported here: vlkit.recipes.navit imports this module (contrastive_step).
    from vlkit.recipes.navit import MIN_PATCHES, input_policy

    vision = model.config.vision
    if not isinstance(vision, ViTConfig):
        raise ValueError(f"input_policy {recipe.input_policy!r} needs a ViT image tower, got {type(vision).__name__}")
    rows, cols = vision.grid
    # Every rank packs its own slice of each micro-batch into its share of the sequences.
    replicas = distributed.get_world_size() * recipe.train.grad_accum
    sequences = recipe.train.local_micro_batch_size(distributed.get_world_size())
    setup = input_policy(
        recipe.input_policy, sequences, patch_size=vision.patch_size, max_patches=rows * cols,
        min_patches=min(MIN_PATCHES, rows * cols), oversample=recipe.pack_oversample,
        patch_dropout=vision.patch_dropout, seed=recipe.train.seed,
        seq_len=rows * cols * recipe.pack_sequence_slots,
    )  # fmt: skip
    dataset = setup.wrap_dataset(
        ImageTextDataset(records, setup.transform, tokenizer.encode, tokenizer.max_len, seed=recipe.train.seed, **text)
    )
    return TrainingInputs(dataset, setup.collate_fn, setup.step_fn(loss_fn), setup.samples_per_batch * replicas)


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    train_data: str | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    init: str | None = None,
    progress: bool = True,
    strategy: Strategy = "ddp",
    device: torch.device | str = "cpu",
    report: bool = True,
) -> RunResult:
    """Train ``recipe`` into ``out_dir``; in a torchrun process group each rank calls this (see the module doc).

    ``report=False`` leaves out ``report.html`` and its figures (plotting costs seconds; sweeps of tiny runs skip it).
    """
    out_dir = Path(out_dir)
    main = distributed.is_main_process()
    progress = progress and main
    pretrained = (out_dir / "pretrain" / "metrics.json").exists()
    if (recipe.image_init or "").startswith("recipe:") and distributed.get_world_size() > 1 and not pretrained:
        # Pretraining is single-process: every rank stops here rather than wait on rank 0 training alone.
        raise ValueError(f"recipe {recipe.name}: train its image tower first: `vlkit train --recipe "
                         f"{str(recipe.image_init).removeprefix('recipe:')} --out {out_dir / 'pretrain'}`")  # fmt: skip
    with distributed.main_process_first():
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "recipe.json").write_text(json.dumps(recipe_json(recipe), indent=2) + "\n")
        # Rank 0 renders / fits and saves; the others then find the data and tokenizer.json and read them.
        records, tokenizer, model = _prepare(recipe, out_dir, train_data, skip_bad, init, progress)
    workers = max(1, recipe.train.num_workers)
    if isinstance(records, WebDatasetSource) and len(records.urls) < distributed.get_world_size() * workers:
        raise ValueError(
            f"{len(records.urls)} shards for {distributed.get_world_size()} ranks x {workers} loader workers: "
            "every worker needs at least one shard"
        )

    loss_fn = build_contrastive_loss(model.config.loss)
    inputs = training_inputs(recipe, model, records, tokenizer, loss_fn, skip_bad)
    # Evaluation is on square images whatever the training input policy: the same test sets for every recipe.
    transform = ImageTransform(image_size=model.config.vision.image_size)
    square_shapes = dataclasses.replace(recipe.shapes, aspect_ratios=None)
    suite: EvalSuite = (
        digits_suite(transform)
        if recipe.data == "digits"
        else shapes_suite(square_shapes, transform, recipe.eval_size, recipe.eval_size)
    )
    train_config = dataclasses.replace(
        recipe.train,
        param_groups=recipe.param_group_rules(model.config),
        batch_size=inputs.batch_size,
        progress=recipe.train.progress and progress,
    )
    trainer = Trainer(
        model,
        train_config,
        inputs.dataset,
        inputs.collate_fn,
        inputs.step_fn,
        out_dir,
        evaluate=lambda m: suite(m, tokenizer),
        device=device,
        # The global order; the trainer hands each rank its slice of every global micro-batch.
        sampler_factory=lambda length, seed: ResumableSampler(range(length), seed=seed),
        strategy=strategy,
    )
    result = trainer.fit(resume=resume)

    metrics: dict[str, Any] = {**result.final_eval, "train_seconds": result.train_seconds, "steps": result.steps,
                               "skipped": result.skipped, "recipe": recipe.name}  # fmt: skip
    padding = logged_mean(result.log_path, "padding_fraction") if main else None
    if padding is not None:
        metrics["padding_fraction"] = padding
    if distributed.is_sharded(trainer.model):
        # Every rank takes part in the gather; rank 0 rebuilds an ordinary model from the full weights.
        full_state = trainer.full_state_dict()
        if main:
            model = build_model(model.config)
            model.load_state_dict(full_state)
            model.tokenizer = tokenizer
    if main:
        model.save_pretrained(out_dir / "model")
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if report:
            figures = write_figures(suite, out_dir)
            write_report(out_dir, f"vlkit · {recipe.name}", metrics, out_dir / "log.jsonl", figures,
                         [recipe.description])  # fmt: skip
    # Nobody returns (and perhaps exits, tearing the process group down) before rank 0 has written the outputs.
    distributed.barrier()
    return RunResult(metrics, out_dir, model)


def is_classification(recipe: Recipe) -> bool:
    """Whether ``recipe`` trains an image classifier (``run_classification``) rather than a dual encoder."""
    return isinstance(get_config(recipe.model), ImageClassifierConfig)


def run_any_recipe(
    recipe: Recipe, out_dir: str | Path, *, resume: bool = False, progress: bool = True, report: bool = True,
    **options: Any,
) -> RunResult | ClassificationResult:  # fmt: skip
    """Train a dual-encoder recipe with ``run_recipe`` (``options`` go to it) or a classifier with
    ``run_classification``, which takes no ``options``."""
    if not is_classification(recipe):
        return run_recipe(recipe, out_dir, resume=resume, progress=progress, report=report, **options)
    given = sorted(name for name, value in options.items() if value not in (None, False))
    if given:
        raise ValueError(f"recipe {recipe.name} trains a classifier; {given} apply to dual-encoder recipes only")
    return run_classification(recipe, out_dir, progress, resume=resume)


def logged_mean(log_path: Path, key: str) -> float | None:
    """The mean of ``key`` over the training steps of a run's ``log.jsonl``; ``None`` when no step logged it."""
    values = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if key in record:
            values.append(float(record[key]))
    return sum(values) / len(values) if values else None


def write_figures(suite: EvalSuite, out_dir: Path) -> list[tuple[str, Path]]:
    figures = []
    for key, zero_shot_set in suite.zero_shot.items():
        details = suite.last_details.get(key)
        if details is None:
            continue
        path = out_dir / f"confusion_{key}.png"
        plot_confusion_matrix(details.confusion, zero_shot_set.class_names, path, f"{key}: true vs predicted class")
        figures.append((f"Confusion matrix, {key} (top-1 {details.top1:.1%}).", path))
    retrieval = suite.last_details.get("retrieval")
    if suite.retrieval is not None and retrieval is not None:
        rows = range(min(8, len(suite.retrieval.images)))
        top = retrieval.similarity.topk(3, dim=1).indices
        captions = [[(suite.retrieval.texts[j], suite.retrieval.text_to_image[j] == i) for j in top[i].tolist()]
                    for i in rows]  # fmt: skip
        path = out_dir / "retrieval.png"
        plot_retrieval_grid([suite.retrieval.images[i] for i in rows], [f"image {i}" for i in rows], captions, path)
        figures.append(("Image -> text retrieval: the top 3 captions for test scenes (green = correct).", path))
    return figures


def recipe_json(recipe: Recipe) -> dict[str, Any]:
    """What a run folder's ``recipe.json`` holds: every field of the recipe as it was trained."""
    data = dataclasses.asdict(recipe)
    data["train"] = recipe.train.to_dict()
    return data
