"""Zero-shot classification with a dual encoder (Radford et al., 2021, section 3.1.4).

images (N, 3, H, W) are scored against class prompts ("a photo of a {}." ...) with the model's own similarity
(``vlkit.eval.similarity``); an image's class is the best-scoring one -> top-1 / top-5 accuracy and a confusion matrix.

With pooled features a class is one text: the renormalised mean of its prompt embeddings (Radford et al.'s prompt
ensemble). Per-token features (FILIP, Yao et al., 2021) cannot be averaged across prompts of different words, so each
prompt is scored and the scores are averaged over the class's templates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlkit.eval.similarity import TextSide, encode_image_side, encode_texts, score_images, token_wise
from vlkit.models import DualEncoder
from vlkit.text import Tokenizer


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    predictions: np.ndarray  # (N,) predicted class index
    labels: np.ndarray  # (N,)
    confusion: np.ndarray  # (C, C) counts, rows = true class
    scores: np.ndarray  # (N, C) the model's image-class similarities


@torch.no_grad()
def class_embeddings(
    model: DualEncoder, tokenizer: Tokenizer, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, E) L2-normalised pooled class embeddings, each the renormalised mean over templates."""
    prompts = [template.format(name) for name in class_names for template in templates]
    # All prompts in one tokenizer batch.
    features = encode_texts(model, tokenizer, prompts, batch_size=max(1, len(prompts)), tokens=False).features
    features = features.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, E)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def encode_images(model: DualEncoder, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(N, E) L2-normalised pooled image embeddings from an iterable of pixel batches."""
    return torch.cat([encode_image_side(model, pixels, tokens=False) for pixels in batches])


def zero_shot_classify(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: Sequence[int] | torch.Tensor
) -> ZeroShotResult:
    scores = (image_features.float() @ class_features.float().T).float()  # (N, C); autocast may hand back bf16
    return classify_scores(scores, labels)


def classify_scores(scores: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> ZeroShotResult:
    """Accuracy and confusion of image-by-class scores (N, C), whichever similarity produced them."""
    labels_np = np.asarray(labels, dtype=np.int64)
    scores = scores.float().cpu()
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices.numpy()
    predictions = top[:, 0]
    num_classes = scores.shape[1]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels_np, predictions), 1)
    return ZeroShotResult(
        top1=float((predictions == labels_np).mean()),
        top5=float((top == labels_np[:, None]).any(axis=1).mean()),
        predictions=predictions,
        labels=labels_np,
        confusion=confusion,
        scores=scores.numpy(),
    )


@torch.no_grad()
def class_scores(
    model: DualEncoder,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    pixel_batches: Iterable[torch.Tensor],
) -> torch.Tensor:
    """(N, C): the model's similarity of each image to each class, image -> text for token-wise models."""
    if token_wise(model):
        # Each prompt is a text; a class's scores are averaged over its templates below.
        prompts = [template.format(name) for name in class_names for template in templates]
        text, per_class = encode_texts(model, tokenizer, prompts), len(templates)
    else:
        # Each class is one text, its prompt ensemble.
        text, per_class = TextSide(class_embeddings(model, tokenizer, class_names, templates)), 1
    similarity, _ = score_images(model, pixel_batches, text)  # (N, C * per_class)
    return similarity.view(len(similarity), len(class_names), per_class).mean(dim=-1)


def evaluate_zero_shot(
    model: DualEncoder,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    pixel_batches: Iterable[torch.Tensor],
    labels: Sequence[int] | torch.Tensor,
) -> ZeroShotResult:
    """Zero-shot classification with the model's own similarity: pooled cosine, or FILIP's token-wise one."""
    return classify_scores(class_scores(model, tokenizer, class_names, templates, pixel_batches), labels)
