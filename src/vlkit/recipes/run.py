"""Run a recipe end to end: data -> tokenizer -> model -> trainer -> evaluation -> model directory + report.

Outputs (the contract other parts rely on): ``out/metrics.json``, ``out/log.jsonl``, ``out/report.html``,
checkpoints under ``out/checkpoints``, and the final model in ``out/model`` (loadable with ``vlkit.from_pretrained``).

Under torchrun every rank calls ``run_recipe``: rank 0 renders the data and fits the tokenizer first and the other
ranks then read its files; all ranks train (``strategy`` "ddp" or "fsdp") and evaluate; only rank 0 writes the
outputs above (an FSDP model is gathered to rank 0 as one ordinary single-file vlkit model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
from vlkit.recipes.base import Recipe
from vlkit.registry import apply_overrides, get_config
from vlkit.text import Tokenizer, train_tokenizer
from vlkit.train import StepOutput, Trainer, distributed, plot_confusion_matrix, plot_retrieval_grid, write_report
from vlkit.train.distributed import Strategy

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """``model`` is the trained plain model on rank 0; on other ranks of an FSDP run it is their sharded module."""

    metrics: dict[str, Any]
    out_dir: Path
    model: DualEncoder


def _shapes_records(recipe: Recipe, data_dir: Path, progress: bool) -> list[ImageTextRecord]:
    """Render the recipe's ShapesWorld training split once; later runs with the same config reuse it."""
    config_file = data_dir / "shapes_config.json"
    wanted = {**recipe.shapes.to_dict(), "sizes": {"train": recipe.train_size}}
    if not (config_file.exists() and json.loads(config_file.read_text()) == wanted):
        shapes.write_shapes(data_dir, recipe.shapes, {"train": recipe.train_size}, progress=progress)
        config_file.write_text(json.dumps(wanted, indent=2, sort_keys=True))
    result = read_records(data_dir / "train.jsonl")
    assert isinstance(result, ReadResult)
    return result.records


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
    model.tokenizer = tokenizer
    return records, tokenizer, model


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
) -> RunResult:
    """Train ``recipe`` into ``out_dir``; in a torchrun process group each rank calls this (see the module doc)."""
    out_dir = Path(out_dir)
    main = distributed.is_main_process()
    progress = progress and main
    with distributed.main_process_first():
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "recipe.json").write_text(json.dumps(_recipe_json(recipe), indent=2) + "\n")
        # Rank 0 renders / fits and saves; the others then find the data and tokenizer.json and read them.
        records, tokenizer, model = _prepare(recipe, out_dir, train_data, skip_bad, init, progress)
    workers = max(1, recipe.train.num_workers)
    if isinstance(records, WebDatasetSource) and len(records.urls) < distributed.get_world_size() * workers:
        raise ValueError(
            f"{len(records.urls)} shards for {distributed.get_world_size()} ranks x {workers} loader workers: "
            "every worker needs at least one shard"
        )

    image_size = model.config.vision.image_size
    transform = ImageTransform(image_size=image_size)
    if isinstance(records, WebDatasetSource):
        dataset = make_webdataset(
            records.urls, transform, tokenizer.encode, tokenizer.max_len, shuffle_buffer=1000,
            seed=recipe.train.seed, skip_bad=skip_bad, pad_id=tokenizer.pad_token_id,
        )  # fmt: skip
    else:
        dataset = ImageTextDataset(
            records, transform, tokenizer.encode, tokenizer.max_len, seed=recipe.train.seed, skip_bad=skip_bad,
            pad_id=tokenizer.pad_token_id,
        )  # fmt: skip
    suite: EvalSuite = (
        digits_suite(transform)
        if recipe.data == "digits"
        else shapes_suite(recipe.shapes, transform, recipe.eval_size, recipe.eval_size)
    )
    loss_fn = build_contrastive_loss(model.config.loss)
    train_config = (
        dataclasses.replace(recipe.train, param_groups=recipe.param_group_rules())
        if recipe.lock != "none"
        else recipe.train
    )
    trainer = Trainer(
        model,
        train_config,
        dataset,
        collate_image_text,
        contrastive_step(loss_fn),
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
        figures = write_figures(suite, out_dir)
        write_report(out_dir, f"vlkit · {recipe.name}", metrics, out_dir / "log.jsonl", figures, [recipe.description])
    # Nobody returns (and perhaps exits, tearing the process group down) before rank 0 has written the outputs.
    distributed.barrier()
    return RunResult(metrics, out_dir, model)


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


def _recipe_json(recipe: Recipe) -> dict[str, Any]:
    data = dataclasses.asdict(recipe)
    data["train"] = recipe.train.to_dict()
    return data
