"""Collectives the contrastive losses need when the global batch is sharded over ranks.

Each rank holds a local shard (b, ...) of a global batch (B = W * b, equal shards). Two patterns:

``all_gather_with_grad``: (b, ...) -> (W * b, ...), rank order. Its backward sums the incoming gradient over ranks
and returns this rank's slice, so rank r receives sum_s dL_s/dx_r. With DDP's gradient averaging, parameters then
get (1/W) sum_s dL_s/dtheta = d(mean_s L_s)/dtheta, i.e. exactly the single-process gradient when the per-rank
losses are scaled so that their mean is the global loss (the convention open_clip's ``gather_with_grad`` uses).

``ring_exchange``: send a block to rank r+1 and receive one from rank r-1 (big_vision / open_clip's neighbour
exchange for the chunked sigmoid loss); used inside custom autograd functions, so it is not differentiable itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def distributed_world(group: ProcessGroup | None, enabled: bool) -> tuple[int, int]:
    """(rank, world size) of ``group`` when a process group is initialised and ``enabled``; else (0, 1)."""
    if not (enabled and dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor, group: ProcessGroup | None
    ) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local = tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts)  # (W * b, ...)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        # Every rank's loss may depend on every shard: sum the gradients over ranks, keep the rows this rank owns.
        # (A reduce-scatter would move W times less data, but gloo has none; all-reduce works on every backend.)
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local
        return grad[start : start + ctx.local], None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all-gather along dim 0: (b, ...) -> (W * b, ...), shards in rank order."""
    return _AllGather.apply(tensor, group)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """All-gather along dim 0 for tensors that need no gradient (masks, labels)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class RingExchange:
    """Start sending ``tensors`` to rank r+1 and receiving same-shaped tensors from rank r-1; ``wait()`` returns them.

    Started before the current block is scored and waited for after, so the transfer overlaps the compute.
    """

    def __init__(self, tensors: list[torch.Tensor], group: ProcessGroup | None, tag: int = 0) -> None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        # Held until wait(): a send buffer must outlive the transfer.
        self.sent = [tensor.contiguous() for tensor in tensors]
        self.received = [torch.empty_like(tensor) for tensor in self.sent]
        send, receive = (rank + 1) % world, (rank - 1) % world
        operations = [dist.P2POp(dist.isend, t, group=group, tag=tag, group_peer=send) for t in self.sent]
        operations += [dist.P2POp(dist.irecv, t, group=group, tag=tag, group_peer=receive) for t in self.received]
        self.requests = dist.batch_isend_irecv(operations)

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        return self.received
