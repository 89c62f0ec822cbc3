"""Zero-shot classification with a dual encoder (Radford et al., 2021, section 3.1.4).

Each class is embedded as the mean of its normalised prompt embeddings ("a photo of a {}." ...); an image's class
is the nearest class embedding. images (N, 3, H, W) -> top-1 / top-5 accuracy and a confusion matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
    features = features.float().view(len(class_names), len(templates), -1).mean(dim=1)  # (C, E)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def encode_images(model: DualEncoder, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(N, E) L2-normalised image embeddings from an iterable of pixel batches."""
    device = next(model.parameters()).device
    return torch.cat([model.encode_image(pixels.to(device), normalize=True).float().cpu() for pixels in batches])


def zero_shot_classify(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: Sequence[int] | torch.Tensor
) -> ZeroShotResult:
    labels_np = np.asarray(labels, dtype=np.int64)
    scores = (image_features.float() @ class_features.float().T).float()  # (N, C); autocast may hand back bf16
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices.numpy()
    predictions = top[:, 0]
    num_classes = class_features.shape[0]
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
