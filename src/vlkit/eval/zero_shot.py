"""Zero-shot classification with a dual encoder (Radford et al., 2021, section 3.1.4).

Each class is embedded as the mean of its normalised prompt embeddings ("a photo of a {}." ...); an image's class
is the nearest class embedding. images (N, 3, H, W) -> top-1 / top-5 accuracy and a confusion matrix.

Models with token-wise interaction (FILIP, Yao et al., 2021) score an image against each prompt with the image ->
text token-wise similarity and average it over a class's templates (``evaluate_zero_shot`` picks the branch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlkit.losses import filip_similarity
from vlkit.models import DualEncoder
from vlkit.text import Tokenizer


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    predictions: np.ndarray  # (N,) predicted class index
    labels: np.ndarray  # (N,)
    confusion: np.ndarray  # (C, C) counts, rows = true class
    scores: np.ndarray  # (N, C) cosine similarities


@torch.no_grad()
def class_embeddings(
    model: DualEncoder, tokenizer: Tokenizer, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, E) L2-normalised class embeddings, each the renormalised mean over templates."""
    device = next(model.parameters()).device
    prompts = [template.format(name) for name in class_names for template in templates]
    batch = tokenizer(prompts)
    features = model.encode_text(batch.input_ids.to(device), batch.attention_mask.to(device), normalize=True)
    # (C, E) on the CPU, beside the image embeddings
    features = features.float().cpu().view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def encode_images(model: DualEncoder, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(N, E) L2-normalised image embeddings from an iterable of pixel batches."""
    device = next(model.parameters()).device
    return torch.cat([model.encode_image(pixels.to(device), normalize=True).float().cpu() for pixels in batches])


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


def uses_token_interaction(model: DualEncoder) -> bool:
    return getattr(model.config, "interaction", "global") == "token"


@torch.no_grad()
def encode_texts_as_tokens(
    model: DualEncoder, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features (M, T, E) of ``texts`` (fixed-length batches, so they concatenate) and their masks (M, T)."""
    device = next(model.parameters()).device
    tokens, masks = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]))
        features, mask = model.encode_text_tokens(batch.input_ids.to(device), batch.attention_mask.to(device))
        tokens.append(features.float().cpu())
        masks.append(mask.cpu())
    return torch.cat(tokens), torch.cat(masks)


@torch.no_grad()
def token_class_scores(
    model: DualEncoder,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    pixel_batches: Iterable[torch.Tensor],
    chunk_size: int = 16,
) -> torch.Tensor:
    """(N, C): FILIP image -> text similarity of each image to each prompt, averaged over a class's templates."""
    device = next(model.parameters()).device
    prompts = [template.format(name) for name in class_names for template in templates]
    text_tokens, text_mask = encode_texts_as_tokens(model, tokenizer, prompts)
    scores = []
    # One image batch at a time: image tokens (N, n, E) of a whole test set need not fit at once.
    for pixels in pixel_batches:
        image_tokens = model.encode_image_tokens(pixels.to(device)).float().cpu()  # (b, n, E)
        similarity, _ = filip_similarity(image_tokens, text_tokens, text_mask, chunk_size=chunk_size)  # (b, C*K)
        scores.append(similarity.view(len(image_tokens), len(class_names), len(templates)).mean(dim=-1))
    return torch.cat(scores)


def evaluate_zero_shot(
    model: DualEncoder,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    pixel_batches: Iterable[torch.Tensor],
    labels: Sequence[int] | torch.Tensor,
) -> ZeroShotResult:
    """Zero-shot classification with the model's own similarity: pooled cosine, or FILIP's token-wise one."""
    if uses_token_interaction(model):
        return classify_scores(token_class_scores(model, tokenizer, class_names, templates, pixel_batches), labels)
    classes = class_embeddings(model, tokenizer, class_names, templates)
    return zero_shot_classify(encode_images(model, pixel_batches), classes, labels)
