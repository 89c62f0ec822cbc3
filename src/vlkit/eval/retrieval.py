"""Image <-> text retrieval recall@K (Karpathy-style: an image may own several captions).

image_features (N, E), text_features (M, E), text_to_image (M,) -> R@1/5/10 in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RetrievalResult:
    image_to_text: dict[int, float]  # K -> recall
    text_to_image: dict[int, float]
    similarity: torch.Tensor  # (N, M)

    def as_dict(self, prefix: str = "retrieval_") -> dict[str, float]:
        out = {f"{prefix}i2t_r{k}": v for k, v in self.image_to_text.items()}
        out.update({f"{prefix}t2i_r{k}": v for k, v in self.text_to_image.items()})
        return out


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> RetrievalResult:
    owner = torch.as_tensor(text_to_image, dtype=torch.long)
    similarity = (image_features.float() @ text_features.float().T).float()  # (N, M); autocast may hand back bf16
    num_images, num_texts = similarity.shape
    if owner.shape != (num_texts,) or int(owner.max()) >= num_images or int(owner.min()) < 0:
        raise ValueError(f"text_to_image must map each of {num_texts} texts to one of {num_images} images")
    correct = owner[None, :] == torch.arange(num_images)[:, None]  # (N, M): text j belongs to image i
    # Rank of the best-ranked correct item: how many wrong items score at least as high. Ties count against
    # the model, so a collapsed embedding (all scores equal) scores zero rather than perfect.
    best_correct_text = similarity.masked_fill(~correct, float("-inf")).max(dim=1).values  # (N,)
    image_rank = ((similarity >= best_correct_text[:, None]) & ~correct).sum(dim=1)
    own_score = similarity[owner, torch.arange(num_texts)]  # (M,)
    text_rank = ((similarity >= own_score[None, :]) & ~correct).sum(dim=0)
    return RetrievalResult(
        image_to_text={k: float((image_rank < k).float().mean()) for k in ks},
        text_to_image={k: float((text_rank < k).float().mean()) for k in ks},
        similarity=similarity,
    )
