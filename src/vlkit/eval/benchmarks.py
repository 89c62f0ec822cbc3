"""The evaluation sets recipes report on: ShapesWorld zero-shot (seen and held-out colour x shape combinations)
and retrieval, and zero-shot classification of scikit-learn's scanned digits.

Sets are built once (images rendered and transformed up front) and reused at every periodic evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from vlkit.data import shapes
from vlkit.data.digits import DIGIT_TEMPLATES, DIGIT_WORDS, digits_split
from vlkit.eval.result import EvalResult
from vlkit.eval.retrieval import RetrievalResult, evaluate_retrieval
from vlkit.eval.zero_shot import ZeroShotResult, evaluate_zero_shot
from vlkit.models import DualEncoder
from vlkit.text import Tokenizer

SHAPES_TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.", "an image with a {}.")

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class ZeroShotSet:
    name: str
    pixels: torch.Tensor  # (N, 3, H, W)
    labels: torch.Tensor  # (N,)
    class_names: list[str]
    templates: tuple[str, ...]


@dataclass
class RetrievalSet:
    pixels: torch.Tensor  # (N, 3, H, W)
    images: list[Image.Image]
    texts: list[str]
    text_to_image: list[int]


@dataclass
class EvalSuite:
    """Zero-shot sets keyed by metric name (``zero_shot_top1``, ...) and an optional retrieval set."""

    zero_shot: dict[str, ZeroShotSet]
    retrieval: RetrievalSet | None = None
    batch_size: int = 256

    @torch.no_grad()
    def __call__(self, model: DualEncoder, tokenizer: Tokenizer) -> EvalResult:
        """Metrics, and each set's ``ZeroShotResult`` / ``RetrievalResult`` as artifacts under the same key."""
        metrics: dict[str, float] = {}
        details: dict[str, ZeroShotResult | RetrievalResult] = {}
        for key, zero_shot_set in self.zero_shot.items():
            result = evaluate_zero_shot(
                model, tokenizer, zero_shot_set.class_names, zero_shot_set.templates,
                zero_shot_set.pixels.split(self.batch_size), zero_shot_set.labels,
            )  # fmt: skip
            # "zero_shot_heldout" -> zero_shot_top1_heldout: the suffix names the image set, not the metric.
            prefix, heldout, _ = key.partition("_heldout")
            metrics[f"{prefix}_top1{heldout}"] = result.top1
            metrics[f"{prefix}_top5{heldout}"] = result.top5
            details[key] = result
        if self.retrieval is not None:
            result = evaluate_retrieval(
                model, tokenizer, self.retrieval.pixels.split(self.batch_size), self.retrieval.texts,
                self.retrieval.text_to_image, self.batch_size,
            )  # fmt: skip
            metrics.update(result.as_dict())
            details["retrieval"] = result
        return EvalResult(metrics, details)


def _stack(images: Sequence[Image.Image], transform: Transform) -> torch.Tensor:
    return torch.stack([transform(image) for image in images])


def shapes_suite(
    config: shapes.ShapesConfig, transform: Transform, size: int = 400, retrieval_size: int = 500, which: str = "test"
) -> EvalSuite:
    """Zero-shot over all colour x shape classes on seen (``test``) and held-out (``test_heldout``) combinations,
    and image<->text retrieval of canonical captions on multi-object ``test`` scenes; ``which="val"``: the same on
    ``val`` and ``val_heldout`` (``shapes.eval_splits``)."""
    names = shapes.class_names(config)
    sets = {}
    splits = shapes.eval_splits(config, which)
    for split in splits:
        key = "zero_shot_heldout" if shapes.is_heldout(split) else "zero_shot"
        samples = [shapes.single_object(config, split, index) for index in range(size)]
        labels = [shapes.class_index(config, s.objects[0].colour, s.objects[0].shape) for s in samples]
        sets[key] = ZeroShotSet(key, _stack([s.image for s in samples], transform), torch.tensor(labels), names,
                                SHAPES_TEMPLATES)  # fmt: skip
    scenes = [shapes.generate(config, splits[0], index) for index in range(retrieval_size)]
    retrieval = RetrievalSet(
        pixels=_stack([s.image for s in scenes], transform),
        images=[s.image for s in scenes],
        texts=[s.captions[0] for s in scenes],
        text_to_image=list(range(len(scenes))),
    )
    return EvalSuite(sets, retrieval)


def digits_suite(transform: Transform) -> EvalSuite:
    images, labels = digits_split("test")
    zero_shot = ZeroShotSet("digits", _stack(images, transform), torch.as_tensor(labels), list(DIGIT_WORDS),
                            DIGIT_TEMPLATES)  # fmt: skip
    return EvalSuite({"zero_shot": zero_shot})
