"""Images scored against texts with the model's own similarity, for every evaluation (zero-shot, retrieval, the
claims bench's hard negatives).

pixel batches (b, 3, H, W) and M texts -> (image -> text, text -> image) similarities, each (N, M) indexed
[image, text]. What a side is encoded as follows the model: L2-normalised pooled features (CLIP, SigLIP), or
per-token features and masks for token-wise late interaction (FILIP, Yao et al., 2021); the scoring itself is
``DualEncoder.similarity``. Features come back as float32 on the CPU, beside the labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from vlkit.models import DualEncoder
from vlkit.text import Tokenizer

__all__ = ["TextSide", "encode_image_side", "encode_texts", "image_text_similarity", "score_images", "token_wise"]


@dataclass
class TextSide:
    """Encoded texts as ``DualEncoder.similarity`` reads them."""

    features: torch.Tensor  # (M, E) pooled, or (M, T, E) per token; L2-normalised
    mask: torch.Tensor | None = None  # (M, T) bool, real tokens; per-token features only


def token_wise(model: DualEncoder) -> bool:
    """Whether the model scores per-token features (FILIP's late interaction) rather than pooled ones."""
    return model.config.interaction == "token"


@torch.no_grad()
def encode_image_side(model: DualEncoder, pixels: torch.Tensor, tokens: bool | None = None) -> torch.Tensor:
    """(b, 3, H, W) -> pooled features (b, E), or per-token features (b, n, E) when ``tokens`` (by default: when
    the model is token-wise); L2-normalised, float32 on the CPU."""
    pixels = pixels.to(next(model.parameters()).device)
    per_token = token_wise(model) if tokens is None else tokens
    if per_token:
        return model.encode_image_tokens(pixels).float().cpu()
    return model.encode_image(pixels, normalize=True).float().cpu()


@torch.no_grad()
def encode_texts(
    model: DualEncoder, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256, tokens: bool | None = None
) -> TextSide:
    """M texts -> pooled features (M, E), or per-token features (M, T, E) and masks when ``tokens`` (by default:
    when the model is token-wise). Fixed-length tokenizer batches, so per-token features concatenate."""
    device = next(model.parameters()).device
    per_token = token_wise(model) if tokens is None else tokens
    features, masks = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]))
        ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        if per_token:
            encoded, mask = model.encode_text_tokens(ids, attention_mask)
            masks.append(mask.cpu())
        else:
            encoded = model.encode_text(ids, attention_mask, normalize=True)
        features.append(encoded.float().cpu())
    return TextSide(torch.cat(features), torch.cat(masks) if per_token else None)


@torch.no_grad()
def score_images(
    model: DualEncoder, pixel_batches: Iterable[torch.Tensor], text: TextSide, chunk_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> text, text -> image), each (N, M), of every image in ``pixel_batches`` against encoded texts."""
    if not token_wise(model):
        # Pooled features are small: one product over all images. (Rows of a product split into image batches can
        # differ from it in the last bit, which would move tied ranks.)
        images = torch.cat([encode_image_side(model, pixels, tokens=False) for pixels in pixel_batches])  # (N, E)
        return model.similarity(images, text.features)
    image_to_text, text_to_image = [], []
    # One image batch at a time: the image tokens (N, n, E) of a whole test set need not fit at once.
    for pixels in pixel_batches:
        image_tokens = encode_image_side(model, pixels, tokens=True)  # (b, n, E)
        i2t, t2i = model.similarity(image_tokens, text.features, text.mask, chunk_size=chunk_size)  # (b, M) each
        image_to_text.append(i2t)
        text_to_image.append(t2i)
    return torch.cat(image_to_text), torch.cat(text_to_image)


@torch.no_grad()
def image_text_similarity(
    model: DualEncoder,
    tokenizer: Tokenizer,
    pixel_batches: Iterable[torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> text, text -> image), each (N, M): how the model scores each image against each text (pooled
    cosine twice, or FILIP's two token-wise similarities). Texts are encoded ``batch_size`` at a time."""
    return score_images(model, pixel_batches, encode_texts(model, tokenizer, texts, batch_size), chunk_size)
