"""FILIP's token-wise late interaction and its contrastive loss (Yao et al., 2021, "FILIP: Fine-grained Interactive
Language-Image Pre-Training").

image tokens (B_i, N, E) and text tokens (B_t, T, E), each L2-normalised per token, with masks of the real tokens
(text padding; image padding for packed inputs). With s(i, j, n, t) = <x_in, y_jt>:

    sim_i2t(i, j) = mean over real image tokens n of  max over real text tokens t  of s(i, j, n, t)
    sim_t2i(i, j) = mean over real text tokens t  of  max over real image tokens n of s(i, j, n, t)

-> two (B_i, B_t) matrices. FILIP's loss is a softmax cross entropy over the rows of t * sim_i2t (image -> text) and
over the columns of t * sim_t2i (text -> image), averaged.

The naive form materialises s for every pair, B_i x B_t x N x T (4.3 GB in fp32 at B = 1024, N = 64, T = 16).
``filip_similarity`` loops over chunks of text rows so the live tensor is B_i x chunk x N x T, and its backward
recomputes each chunk and routes the gradient through the argmax positions instead of storing anything per chunk
(a custom autograd function): memory beyond the inputs is O(B_i x chunk x N x T) in both passes.

With a batch sharded over ranks, ``FilipLoss`` gathers every rank's tokens with a differentiable all-gather (like
``ClipLoss``) and scores its own rows against all columns: the rank mean of the losses is the global loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from vlkit.losses.contrastive import _scoring_dtype
from vlkit.losses.distributed import all_gather_no_grad, all_gather_with_grad, distributed_world


def _masks(
    image: torch.Tensor, text: torch.Tensor, image_mask: torch.Tensor | None, text_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (B_i, N), (B_t, T), checked: every image and text needs a real token to take a max over."""
    image_mask = image_mask.bool() if image_mask is not None else image.new_ones(image.shape[:2], dtype=torch.bool)
    text_mask = text_mask.bool() if text_mask is not None else text.new_ones(text.shape[:2], dtype=torch.bool)
    for name, tokens, mask in (("image", image, image_mask), ("text", text, text_mask)):
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"{name}_mask has shape {tuple(mask.shape)}; the tokens need {tuple(tokens.shape[:2])}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError(f"every {name} needs at least one real (unmasked) token")
    return image_mask, text_mask


def _chunk_scores(image: torch.Tensor, text_chunk: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ine,jte->ijnt", image, text_chunk)  # (B_i, c, N, T)


class _FilipSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        image: torch.Tensor,
        text: torch.Tensor,
        image_mask: torch.Tensor,
        text_mask: torch.Tensor,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        accumulate = torch.promote_types(image.dtype, torch.float32)
        image_weight = image_mask.to(accumulate) / image_mask.sum(1, keepdim=True)  # (B_i, N), rows sum to 1
        text_weight = text_mask.to(accumulate) / text_mask.sum(1, keepdim=True)  # (B_t, T)
        image_to_text = image.new_empty((image.shape[0], text.shape[0]), dtype=accumulate)
        text_to_image = torch.empty_like(image_to_text)
        for start in range(0, text.shape[0], chunk_size):
            stop = start + chunk_size
            scores = _chunk_scores(image, text[start:stop])
            # Padding never wins a max: -inf there. Every row has a real token, so the maxima are finite.
            best_text = scores.masked_fill(~text_mask[None, start:stop, None, :], float("-inf")).amax(-1)
            image_to_text[:, start:stop] = (best_text.to(accumulate) * image_weight[:, None, :]).sum(-1)
            best_image = scores.masked_fill(~image_mask[:, None, :, None], float("-inf")).amax(-2)  # (B_i, c, T)
            text_to_image[:, start:stop] = (best_image.to(accumulate) * text_weight[None, start:stop]).sum(-1)
        ctx.save_for_backward(image, text, image_mask, text_mask)
        ctx.chunk_size = chunk_size
        return image_to_text, text_to_image

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_image_to_text: torch.Tensor, grad_text_to_image: torch.Tensor
    ):
        image, text, image_mask, text_mask = ctx.saved_tensors
        chunk_size: int = ctx.chunk_size
        image_weight = image_mask.to(image.dtype) / image_mask.sum(1, keepdim=True)  # (B_i, N)
        text_weight = text_mask.to(image.dtype) / text_mask.sum(1, keepdim=True)  # (B_t, T)
        grad_i2t, grad_t2i = grad_image_to_text.to(image.dtype), grad_text_to_image.to(image.dtype)
        grad_image = torch.zeros_like(image)
        grad_text = torch.zeros_like(text)
        for start in range(0, text.shape[0], chunk_size):
            stop = start + chunk_size
            scores = _chunk_scores(image, text[start:stop])
            best_text = scores.masked_fill(~text_mask[None, start:stop, None, :], float("-inf")).argmax(-1)
            best_image = scores.masked_fill(~image_mask[:, None, :, None], float("-inf")).argmax(-2)  # (B_i, c, T)
            # Each max passes its upstream gradient to the one score it picked: a sparse (B_i, c, N, T) weight,
            # then one contraction per side.
            weight = torch.zeros_like(scores)
            upstream = grad_i2t[:, start:stop, None] * image_weight[:, None]  # (B_i, c, N)
            weight.scatter_add_(-1, best_text[..., None], upstream[..., None])
            upstream = grad_t2i[:, start:stop, None] * text_weight[None, start:stop]  # (B_i, c, T)
            weight.scatter_add_(-2, best_image[:, :, None, :], upstream[:, :, None, :])
            grad_image += torch.einsum("ijnt,jte->ine", weight, text[start:stop])
            grad_text[start:stop] = torch.einsum("ijnt,ine->jte", weight, image)
        return grad_image, grad_text, None, None, None


def filip_similarity(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP similarities (sim_i2t, sim_t2i), each (B_i, B_t) indexed [image, text], from tokens (B_i, N, E) and
    (B_t, T, E); masks (B_t, T) / (B_i, N) are nonzero at real tokens. Differentiable; chunked over text rows."""
    if image_tokens.ndim != 3 or text_tokens.ndim != 3 or image_tokens.shape[-1] != text_tokens.shape[-1]:
        raise ValueError(
            f"need image tokens (B, N, E) and text tokens (B, T, E); got {tuple(image_tokens.shape)} and "
            f"{tuple(text_tokens.shape)}"
        )
    image_mask, text_mask = _masks(image_tokens, text_tokens, image_mask, text_mask)
    dtype = torch.promote_types(image_tokens.dtype, text_tokens.dtype)
    return _FilipSimilarity.apply(image_tokens.to(dtype), text_tokens.to(dtype), image_mask, text_mask, chunk_size)


class FilipLoss(nn.Module):
    """FILIP's contrastive loss over token-wise similarities; a sharded batch gathers tokens like ``ClipLoss``."""

    def __init__(self, chunk_size: int = 16, group: ProcessGroup | None = None, distributed: bool = True) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.group = group
        self.distributed = distributed

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        *,
        text_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"{image_tokens.shape[0]} images but {text_tokens.shape[0]} texts: the loss pairs them")
        image_mask, text_mask = _masks(image_tokens, text_tokens, image_mask, text_mask)
        rank, world = distributed_world(self.group, self.distributed)
        local = image_tokens.shape[0]
        if world == 1:
            image_to_text, text_to_image = filip_similarity(
                image_tokens, text_tokens, text_mask, image_mask, self.chunk_size
            )
            text_to_image = text_to_image.T  # (B_t, B_i): rows are the text queries
        else:
            all_image = all_gather_with_grad(image_tokens, self.group)  # (B, N, E)
            all_text = all_gather_with_grad(text_tokens, self.group)  # (B, T, E)
            all_image_mask = all_gather_no_grad(image_mask, self.group)
            all_text_mask = all_gather_no_grad(text_mask, self.group)
            # Each call also reduces the direction it is not used for: wasted max/mean passes, cheap next to the
            # (b x B x N x T x E) contraction both directions need anyway.
            image_to_text, _ = filip_similarity(image_tokens, all_text, all_text_mask, image_mask, self.chunk_size)
            _, text_to_image = filip_similarity(all_image, text_tokens, text_mask, all_image_mask, self.chunk_size)
            text_to_image = text_to_image.T  # (b, B)
        image_logits, text_logits = logit_scale * image_to_text, logit_scale * text_to_image
        if logit_bias is not None:
            image_logits, text_logits = image_logits + logit_bias, text_logits + logit_bias
        labels = torch.arange(local, device=image_tokens.device) + rank * local
        image_logits, text_logits = _scoring_dtype(image_logits), _scoring_dtype(text_logits)  # as ClipLoss scores
        return (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2
