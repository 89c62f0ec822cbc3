"""Image-text contrastive losses, correct on one process and on a batch sharded over ranks.

``ClipLoss``: softmax InfoNCE over the B x B similarity matrix, averaged over both directions (Radford et al., 2021).
``SigLipLoss``: the pairwise sigmoid loss, -1/B * sum_ij log sigmoid(z_ij (t x_i.y_j + b)) with z_ij = +1 on the
diagonal and -1 elsewhere (Zhai et al., 2023). It never needs a global normalisation, so it is computed in chunks
of text rows: forward and backward each hold only (b x chunk) logits, not (B x B) — the backward pass recomputes
each chunk instead of storing it (a custom autograd function).

Both score in at least fp32 whatever the autocast context: a tower under bf16 autocast hands them bf16 features,
which are cast (differentiably; their gradients return in bf16) before the logits are formed. A bf16 logit near
SigLIP's bias of -10 is resolved to 1/16, which moves a pair's sigmoid gradient by up to ~6 %, and CLIP's logits at a
scale of 100 to 1/4; on ShapesWorld fp32 scoring trained more accurate towers over five seeds (docs/experiments.md).

Inputs are L2-normalised features (b, E) — the local shard when ``torch.distributed`` is initialised with more than
one rank (detected automatically; ``group=`` picks a process group, ``distributed=False`` opts out), else the
whole batch; ``logit_scale`` is the multiplier t (already exponentiated).

Distributed contract (equal shards, B = W * b): the mean over ranks of the per-rank losses is the single-process
loss of the concatenated batch, and with DDP's gradient averaging the parameter gradients are the single-process
ones. ClipLoss gathers every rank's features (differentiable all-gather) and scores its own b rows against all B
columns in both directions, mean over its rows. SigLipLoss passes text blocks around a ring of ranks (big_vision's
chunked sigmoid loss): rank r scores its b images against each of the W text blocks in turn, so it never holds
more than its own block, one block in flight and (b x chunk) logits; its loss is -1/b * sum over its b rows and all
B columns, whose rank mean is -1/B * sum over all pairs. The backward pass walks the ring again and carries each
text block's gradient along with it, so the gradient ends on the rank that owns the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from vlkit.losses.distributed import RingExchange, all_gather_with_grad, distributed_world


class ClipLoss(nn.Module):
    """Softmax contrastive loss; with a sharded batch, local rows against gathered columns."""

    def __init__(self, group: ProcessGroup | None = None, distributed: bool = True) -> None:
        super().__init__()
        self.group = group
        self.distributed = distributed

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, world = distributed_world(self.group, self.distributed)
        with torch.autocast(image_features.device.type, enabled=False):
            image, text = _scoring_dtype(image_features), _scoring_dtype(text_features)
            all_image, all_text = image, text
            if world > 1:
                all_image = all_gather_with_grad(image, self.group)  # (B, E)
                all_text = all_gather_with_grad(text, self.group)
            scale = logit_scale.to(image.dtype)
            image_to_text = scale * image @ all_text.T  # (b, B)
            text_to_image = scale * text @ all_image.T  # (b, B)
            if logit_bias is not None:
                image_to_text, text_to_image = image_to_text + logit_bias, text_to_image + logit_bias
            local = image.shape[0]
            labels = torch.arange(local, device=image.device) + rank * local
            return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


def _scoring_dtype(features: torch.Tensor) -> torch.Tensor:
    """Features cast (differentiably) to at least fp32: logits are formed in fp32 even under bf16 autocast."""
    return features.to(torch.promote_types(features.dtype, torch.float32))


def _sigmoid_chunk_terms(
    image: torch.Tensor, text_chunk: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (b, c) of one text chunk and the sign matrix z: +1 where row == offset + column, -1 elsewhere
    (``offset=None``: a block of another rank's texts, all negatives)."""
    logits = scale * image @ text_chunk.T + bias  # (b, c)
    if offset is None:
        return logits, logits.new_tensor(-1.0)  # a broadcast scalar: no (b, c) sign matrix for negatives-only blocks
    rows = torch.arange(image.shape[0], device=image.device)[:, None]
    cols = torch.arange(text_chunk.shape[0], device=image.device)[None, :] + offset
    signs = (rows == cols).to(logits.dtype) * 2 - 1
    return logits, signs


class _SigmoidLoss(torch.autograd.Function):
    """-1/b sum over local image rows and all (ring-visited) text columns of log sigmoid(z * logits)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        chunk_size: int,
        group: ProcessGroup | None,
        world: int,
    ) -> torch.Tensor:
        # Accumulate in at least fp32 (bf16 sums lose too many bits), but keep fp64 inputs in fp64.
        accumulate = torch.promote_types(image.dtype, torch.float32)
        total = image.new_zeros((), dtype=accumulate)
        block = text
        for step in range(world):
            # Step k holds the text block of rank r - k; the next one travels while this one is scored.
            exchange = RingExchange([block], group) if step < world - 1 else None
            for start in range(0, block.shape[0], chunk_size):
                offset = start if step == 0 else None
                logits, signs = _sigmoid_chunk_terms(image, block[start : start + chunk_size], scale, bias, offset)
                total = total - F.logsigmoid(signs * logits).to(accumulate).sum()
            if exchange is not None:
                (block,) = exchange.wait()
        ctx.save_for_backward(image, text, scale, bias)
        ctx.chunk_size, ctx.group, ctx.world = chunk_size, group, world
        return total / image.shape[0]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        image, text, scale, bias = ctx.saved_tensors
        chunk_size: int = ctx.chunk_size
        world: int = ctx.world
        grad_image = torch.zeros_like(image)
        accumulate = torch.promote_types(image.dtype, torch.float32)
        grad_scale = torch.zeros_like(scale, dtype=accumulate)
        grad_bias = torch.zeros_like(bias, dtype=accumulate)
        factor = grad_output / image.shape[0]
        block, grad_block = text, torch.zeros_like(text)
        for step in range(world):
            prefetch = RingExchange([block], ctx.group, tag=0) if step < world - 1 else None
            for start in range(0, block.shape[0], chunk_size):
                chunk = block[start : start + chunk_size]
                logits, signs = _sigmoid_chunk_terms(image, chunk, scale, bias, start if step == 0 else None)
                # d/dl [-log sigmoid(z l)] = -z sigmoid(-z l)
                grad_logits = (-signs * torch.sigmoid(-signs * logits)) * factor  # (b, c)
                grad_image += scale * grad_logits @ chunk
                grad_block[start : start + chunk_size] += scale * grad_logits.T @ image
                grad_scale += (grad_logits * (image @ chunk.T)).sum().to(accumulate)
                grad_bias += grad_logits.sum().to(accumulate)
            if world > 1:
                # The block's gradient follows the block one hop; after W hops it is back on its owner, holding
                # the sum over all ranks' losses (the same convention as the all-gather's backward).
                (grad_block,) = RingExchange([grad_block], ctx.group, tag=1).wait()
            if prefetch is not None:
                (block,) = prefetch.wait()
        grads = (grad_image, grad_block, grad_scale.to(scale.dtype), grad_bias.to(bias.dtype))
        return (*grads, None, None, None)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss, chunked over text rows so memory is O(b x chunk_size); a ring over ranks when sharded."""

    def __init__(self, chunk_size: int = 1024, group: ProcessGroup | None = None, distributed: bool = True) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.group = group
        self.distributed = distributed

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(f"feature shapes differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
        _, world = distributed_world(self.group, self.distributed)
        bias = logit_bias if logit_bias is not None else logit_scale.new_zeros(())
        image, text = _scoring_dtype(image_features), _scoring_dtype(text_features)
        dtype = torch.promote_types(image.dtype, text.dtype)
        with torch.autocast(image.device.type, enabled=False):
            return _SigmoidLoss.apply(
                image.to(dtype),
                text.to(dtype),
                logit_scale.to(dtype),
                bias.to(dtype),
                self.chunk_size,
                self.group,
                world,
            )
