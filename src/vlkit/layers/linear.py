"""``nn.Linear`` with faster CPU inference kernels: (..., in) -> (..., out).

At inference on CPU (no autograd), ``F.linear`` in fp32 goes to MKL, whose matrix-vector product runs on one thread:
a decoder reading its weights once per generated token then streams them at a third of the memory bandwidth.
oneDNN's inner product (the kernel ``torch.compile`` uses for frozen CPU linears) splits the product across threads.
It reads weights fastest from its own blocked layout: with ``pack=True`` a packed copy of each weight is made on first
use (and again whenever the weight changes), which costs the weight's memory a second time and, on the 2-core AVX-512
machine of bench/generate.py, makes batch-8 decoding 1.5x faster than oneDNN on the plain layout. On Intel CPUs
MKL's one-row product is threaded and the fastest kernel (bench/generate.py on a 2-core AMX Xeon: the model's
products at one row 147 tok/s through ``F.linear``, 98 % of the memory bound, against 120 through packed oneDNN; at
eight rows 478 against 722), so there a single fp32 row goes to ``F.linear``. Training and other devices keep
``F.linear``; the numbers are the same up to summation order.

Inside ``torch.compile`` (the decoder LM's compiled decoding steps) a single row without autograd on CPU is a
multiply-and-sum instead, which inductor emits as one reduction streaming the weight across threads: on the 2-core
AVX-512 EPYC of bench/generate.py it read the 32000 x 512 head at 29-39 GB/s, against 16-22 for packed oneDNN and 8
for MKL, and the blocks' weights at 12-28 against 13-20 (GB/s of the weights, 2 threads; its sum() reads at 32).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.cpuinfo import cpuinfo_field

# Packed copies by id of the weight tensor (not stored on it, so deepcopy / pickling of models never meets the opaque
# oneDNN tensors): the weight (weakly, so an entry dies with it), its version and storage when packed, the copy.
_PACKED: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, int], torch.Tensor | None]] = {}


# Whether one fp32 row is multiplied fastest by MKL (F.linear): on Intel CPUs, read once at import.
MKL_ONE_ROW = cpuinfo_field("vendor_id") == "GenuineIntel"
# The rows oneDNN is told to lay a packed weight out for (its blocking; any number of rows then runs on it). On the
# 2-core AVX-512 EPYC, a layout for 1024 rows runs bench/generate.py's products 13-32 % faster than one for 8 at 1 to
# 16 rows (bench/pack_layout.py: 6.8 against 9.2 ms for all of them at 8 rows, best of 30). Intel CPUs keep the
# layout for 8 that their decoding numbers were measured with (not yet compared there, nor on the AVX2-only EPYC).
_PACK_BATCH_HINT = 8 if MKL_ONE_ROW else 1024


@functools.cache
def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    # Inference-mode tensors have no version counter; they cannot change in place outside inference mode either.
    key = (0 if weight.is_inference() else weight._version, weight.data_ptr())
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != key:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)
        except RuntimeError:  # a dtype this CPU's oneDNN cannot pack (bf16 without AVX-512 BF16): the plain kernels
            packed = None
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        entry = (weakref.ref(weight), key, packed)
        _PACKED[id(weight)] = entry
    return entry[2]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = False) -> torch.Tensor:
    """``F.linear``; without autograd on CPU, oneDNN's kernel on fp32 (and, with ``pack``, on a packed bf16 or fp32
    copy of ``weight``), except a single fp32 row on Intel CPUs (``MKL_ONE_ROW``), which MKL serves faster, and a
    single row being compiled, which becomes a multiply-and-sum."""
    one_row = x.numel() == x.shape[-1]
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.device.type == "cpu":
        if not one_row:  # the eager kernel below, opaque to the compiler (it cannot trace the packed copies)
            return torch.ops.vlkit.linear(x, weight, bias, pack)
        out = (weight * x.reshape(1, -1)).sum(-1)  # (out,): one streaming reduction over the weight's rows
        out = out if bias is None else out + bias
        return out.view(*x.shape[:-1], weight.shape[0])
    if (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and _onednn_linear_available()
        and not (MKL_ONE_ROW and x.dtype == torch.float32 and one_row)
    ):
        packed = _packed(weight) if pack else None
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        if x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# ``linear`` as one operator that ``torch.compile`` calls rather than traces: several rows inside the decoder LM's
# compiled decoding steps keep the eager kernel (packed oneDNN), which no kernel inductor generates beats at a few rows
# (bench/generate.py's products at 8 rows on the 2-core AVX-512 EPYC: packed oneDNN 56-2300 us, MKL's packed GEMM
# 1.8-3.7x and inductor's C++ GEMM template 1.5-2.5x slower). Registered through ``torch.library.Library`` rather than
# ``custom_op``, whose wrapping costs ~3 us more a call (33 calls a step).
_LIBRARY = torch.library.Library("vlkit", "DEF")
_LIBRARY.define("linear(Tensor x, Tensor weight, Tensor? bias, bool pack) -> Tensor")
_LIBRARY.impl("linear", linear, "CPU")  # run outside the compiler, without autograd: the eager kernel
_LIBRARY.impl("linear", lambda x, weight, bias, pack: x.new_empty(*x.shape[:-1], weight.shape[0]), "Meta")


def release_packed(weights: Iterable[torch.Tensor]) -> None:
    """Drop the packed copies of ``weights`` (they are also dropped with the weights themselves)."""
    for weight in weights:
        entry = _PACKED.get(id(weight))
        if entry is not None and entry[0]() is weight:
            del _PACKED[id(weight)]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``vlkit.layers.linear.linear``."""

    pack: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.pack)


def use_fast_linears(module: nn.Module, pack: bool = False) -> nn.Module:
    """Make every ``nn.Linear`` inside ``module`` a ``Linear`` holding the same parameters, packing or not."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fast = Linear.__new__(Linear)
                fast.__dict__.update(child.__dict__)
                setattr(parent, name, fast)
                child = fast
            if isinstance(child, Linear):
                child.pack = pack
    return module
