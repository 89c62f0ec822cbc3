"""Distributed training plumbing: process group, rank helpers, DDP / FSDP2 wrapping and global-batch slicing.

Launch: ``torchrun --nproc_per_node N -m vlkit train ...`` exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``distributed_context()`` reads them, initialises the default process group (gloo on CPU, NCCL on
CUDA), pins the CUDA device to LOCAL_RANK and destroys the group on exit. Without those variables every helper
here answers for a single process (rank 0 of 1), so the trainer keeps one code path.

Strategies (``wrap_model``):
  "ddp"   DistributedDataParallel: every rank holds the whole model; gradients are all-reduced (averaged) during
          backward (Li et al., 2020, "PyTorch Distributed").
  "fsdp"  FSDP2, ``torch.distributed.fsdp.fully_shard`` on every transformer block and then on the root: parameters,
          gradients and optimizer state are sharded as DTensors; a block's parameters are all-gathered just for its
          forward and backward (Zhao et al., 2023, "PyTorch FSDP").

Data: a recipe's batch size is *global*. ``GlobalBatchSampler`` reads one global order (the trainer's seeded
permutation) in global micro-batches of ``batch_size / grad_accum`` indices and hands rank r the r-th contiguous
slice of each, so step s is the same set of samples in the same order whatever the world size is, and
concatenating the ranks' slices in rank order gives back the single-process micro-batch.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

__all__ = [
    "DistributedInfo",
    "GlobalBatchSampler",
    "Strategy",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "clip_grad_norm",
    "destroy_distributed",
    "distributed_context",
    "full_state_dict",
    "get_rank",
    "get_world_size",
    "gradient_sync",
    "init_distributed",
    "is_main_process",
    "is_sharded",
    "main_process_first",
    "rank_seed",
    "sync_replicated_gradients",
    "unwrap_model",
    "wrap_model",
]

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp")

# Methods other than forward that evaluation calls on a dual encoder / VLM; under FSDP2 they must run the same
# unshard/reshard hooks as forward, or the root's own parameters (projections, embeddings) stay sharded.
FSDP_FORWARD_METHODS = ("encode_image", "encode_text", "embed_image", "generate")

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: its rank, the world size, its local rank on the node and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | torch.device | None = None, timeout_minutes: float = 30.0) -> DistributedInfo:
    """Initialise the default process group from torchrun's environment; a no-op in a single process.

    ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; "cuda" means the local rank's
    GPU. The backend follows the device: NCCL for CUDA, gloo for the CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    wanted = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if wanted is None else wanted.type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA devices")
        resolved = torch.device("cuda", local_rank if wanted is None or wanted.index is None else wanted.index)
        torch.cuda.set_device(resolved)
    else:
        resolved = torch.device("cpu")
    if world_size <= 1:
        return DistributedInfo(rank=0, world_size=1, local_rank=local_rank, device=resolved)
    backend = "nccl" if use_cuda else "gloo"
    if not is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            # Binding NCCL to its device up front avoids a lazy, possibly wrong, guess at the first collective.
            device_id=resolved if use_cuda else None,
        )
    return DistributedInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=resolved, backend=backend
    )


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_context(
    device: str | torch.device | None = None, timeout_minutes: float = 30.0
) -> Iterator[DistributedInfo]:
    """``with distributed_context() as info:`` — initialise (if launched by torchrun) and always tear down."""
    created = not is_initialized()
    info = init_distributed(device, timeout_minutes)
    try:
        yield info
    finally:
        if created:
            destroy_distributed()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (rendering data, fitting a tokenizer), the others then find its files."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def all_reduce(tensor: Tensor, op: Literal["sum", "mean", "max", "min"] = "sum") -> Tensor:
    """A reduced copy of ``tensor`` over all ranks (``tensor`` itself is left untouched)."""
    result = tensor.detach().clone()
    if get_world_size() == 1:
        return result
    dist.all_reduce(result, op=_REDUCE_OPS[op])
    # gloo has no AVG, so the mean is a sum divided here, on every backend alike.
    return result / get_world_size() if op == "mean" else result


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` holds it, on every rank (picklable objects; our own processes only)."""
    if get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(value: Any) -> list[Any]:
    if get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams: ``seed`` itself on rank 0 (a single process is unchanged),
    a hash of (seed, rank) elsewhere, so dropout masks differ between ranks yet repeat from run to run."""
    if rank == 0:
        return seed
    state = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: transformer blocks, else the items of ``blocks``/``layers`` lists."""
    from vlkit.layers.transformer import TransformerBlock

    units = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    if units:
        return units
    return [
        child
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "layers")
        for child in module
    ]


def wrap_model(model: nn.Module, strategy: Strategy, device: torch.device) -> nn.Module:
    """Wrap ``model`` (already on ``device``, freezing already applied) for ``strategy``; unchanged in one process.

    FSDP2 shards each rank's *own* copy, so every rank must start from the same weights: rank 0's are broadcast
    first (DDP does the same in its constructor).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if get_world_size() == 1:
        return model
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    # FSDP2 cannot shard 0-d parameters (a dual encoder's logit_scale and logit_bias): they stay whole on every
    # rank, outside FSDP, and ``sync_replicated_gradients`` averages their gradients as DDP would.
    scalars = [parameter for parameter in model.parameters() if parameter.ndim == 0]
    for unit in _shard_units(model):
        fully_shard(unit, ignored_params={p for p in unit.parameters() if p.ndim == 0} or None)
    fully_shard(model, ignored_params=set(scalars) or None)
    model._vlkit_replicated_parameters = scalars
    for name in FSDP_FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def sync_replicated_gradients(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP2 left whole (see ``wrap_model``) over ranks; else a no-op."""
    parameters = [p for p in getattr(model, "_vlkit_replicated_parameters", []) if p.requires_grad]
    if not parameters or get_world_size() == 1:
        return
    # A parameter unused on some rank has no gradient there; it contributes zeros, as under DDP.
    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = all_reduce(torch.cat([gradient.reshape(-1) for gradient in gradients]), "mean")
    for parameter, gradient in zip(parameters, flat.split([p.numel() for p in parameters]), strict=True):
        parameter.grad = gradient.view_as(parameter).to(parameter.dtype)


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 module (parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module: DDP's ``.module``; an FSDP2 model is its own (sharded) module."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulated step."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip to the *global* gradient norm and return it.

    DDP gradients are already averaged and identical on every rank, so the local norm is the global one. FSDP2
    gradients are DTensor shards: their norm comes back as a DTensor whose ``full_tensor()`` reduces over ranks;
    the parameters FSDP2 left whole have identical (averaged) gradients everywhere and add their local norm.
    """
    from torch.distributed.tensor import DTensor

    with_gradients = [parameter for parameter in parameters if parameter.grad is not None]
    # DTensor and plain gradients cannot share one foreach norm: two partial norms, combined.
    kinds = [
        [parameter for parameter in with_gradients if isinstance(parameter.grad, DTensor) == sharded]
        for sharded in (True, False)
    ]
    squares = []
    for group in kinds:
        if group:
            norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in group], norm_type=2.0)
            squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square())
    if not squares:
        return 0.0
    total_norm = torch.stack([square.to(squares[0].device) for square in squares]).sum().sqrt()
    if math.isfinite(max_norm):
        for group in kinds:
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
    return float(total_norm)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) CPU state dict on rank 0, ``{}`` elsewhere; a collective under FSDP2."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return state if is_main_process() else {}
    if not is_main_process():
        return {}
    return {key: value.detach().cpu() for key, value in unwrap_model(model).state_dict().items()}


class GlobalBatchSampler(Sampler[int]):
    """Rank ``rank``'s share of a global order, one contiguous slice of every global micro-batch.

    ``order`` yields the epoch's global indices (from its resume position on); they are read in chunks of
    ``global_micro_batch`` and rank r keeps positions ``[r * L, (r + 1) * L)`` of each chunk, ``L =
    global_micro_batch / world_size``. A final chunk shorter than ``global_micro_batch`` is dropped on every rank,
    exactly as a single process with ``drop_last`` drops it, so all world sizes consume the same samples.
    """

    def __init__(self, order: Sampler[int], global_micro_batch: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if global_micro_batch < 1 or global_micro_batch % world_size:
            raise ValueError(
                f"the global micro-batch ({global_micro_batch}) must be a positive multiple of the world size "
                f"({world_size})"
            )
        self.order = order
        self.global_micro_batch = global_micro_batch
        self.rank = rank
        self.world_size = world_size
        self.local_micro_batch = global_micro_batch // world_size

    def __len__(self) -> int:
        if not isinstance(self.order, Sized):
            raise TypeError("the wrapped order has no length")
        return len(self.order) // self.global_micro_batch * self.local_micro_batch

    def __iter__(self) -> Iterator[int]:
        start, stop = self.rank * self.local_micro_batch, (self.rank + 1) * self.local_micro_batch
        chunk: list[int] = []
        for index in self.order:
            chunk.append(index)
            if len(chunk) == self.global_micro_batch:
                yield from chunk[start:stop]
                chunk = []
