"""``nn.Linear`` with a faster CPU inference kernel: (..., in) -> (..., out).

At inference on CPU (no autograd), ``F.linear`` in fp32 goes to MKL, whose matrix-vector product runs on one thread:
a decoder reading its weights once per generated token then streams them at a third of the memory bandwidth.
oneDNN's inner product (the kernel ``torch.compile`` uses for frozen CPU linears) splits the same product across
threads and reads the weights about twice as fast at batch 1-8. Training and every other device keep ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 CPU inference (same numbers up to summation order)."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and _onednn_linear_available()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``vlkit.layers.linear.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_fast_linears(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` inside ``module`` by a ``Linear`` holding the same parameters."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fast = Linear.__new__(Linear)
                fast.__dict__.update(child.__dict__)
                setattr(parent, name, fast)
    return module
