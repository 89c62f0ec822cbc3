"""The CPU kernel choices behind ``layers/attention.py`` and ``layers/mlp.py``, measured: forward + backward in bf16.

Attention: for a grid of head widths (32, 64, 128) and key lengths (64-1024), causal and not, at a fixed amount of
work per call (batch x heads x keys x head_dim = 2^21 elements per tensor), four ways of computing bf16 attention
with gradients:

- ``bf16``: ``F.scaled_dot_product_attention`` on the bf16 tensors (PyTorch's CPU flash kernel in bf16, both ways);
- ``fp32``: the same kernel on fp32 copies, both ways (vlkit's path on CPUs without AMX);
- ``bf16_fwd_fp32_bwd``: the bf16 kernel's forward, the fp32 kernel's backward (vlkit's path on AMX CPUs for short
  keys);
- ``products``: two bf16 products and a softmax (``attention._math_attention``: ``sdpa``'s path with
  ``bf16_products=True`` in training on CPUs without AMX, no mask, up to 4 keys per head channel causal, 8 otherwise);
- ``vlkit``: ``vlkit.layers.attention.sdpa`` as this CPU runs it by default (one of the above).

Each is timed as the median of ``--repeats`` calls after a warm-up; the JSON also gives each gradient's largest error
relative to fp64 attention on the same bf16 inputs. Then QuickGELU (x * sigmoid(1.702 x)) on a CLIP ViT-B/16 MLP
activation at batch 16 (3152 x 3072), bf16 and fp32: the plain expression left to autograd against vlkit's
``QuickGELU`` (a two-kernel backward).

    python bench/cpu_kernels.py --out bench/results/cpu_kernels_amx.json [--repeats 5]
    python bench/cpu_kernels.py --out /tmp/kernels.json --quick      # a small grid and one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import train_step as ts
from vlkit.layers import attention
from vlkit.layers.mlp import QuickGELU

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
WORK = 2**21  # elements per q, k or v tensor


def bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal).to(q.dtype)


def bf16_fwd_fp32_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return attention._Fp32Attention.apply(q, k, v, None, causal, False)


def products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return attention._math_attention(q, k, v, causal)


def vlkit_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return attention.sdpa(q, k, v, is_causal=causal)


def fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)


def time_backward(fn: Callable[[list[torch.Tensor]], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor,
                  repeats: int) -> tuple[float, list[torch.Tensor]]:  # fmt: skip
    """Median seconds of forward + backward over ``repeats`` calls after one warm-up (0: the one call, timed); the last
    call's gradients."""
    times = []
    for index in range(repeats + 1 if repeats else 1):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        fn(leaves).backward(grad)
        if index or not repeats:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], [leaf.grad.detach().double() for leaf in leaves]  # type: ignore[union-attr]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest error of any of the tensors, relative to that tensor's largest magnitude."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True))


def attention_grid(repeats: int, quick: bool) -> list[dict[str, Any]]:
    rows = []
    ways: dict[str, Attend] = {"bf16": bf16, "fp32": fp32, "bf16_fwd_fp32_bwd": bf16_fwd_fp32_bwd,
                               "products": products, "vlkit": vlkit_sdpa}  # fmt: skip
    work = 2**12 if quick else WORK
    for head_dim in (16,) if quick else (32, 64, 128):
        for keys in (8, 16) if quick else (64, 128, 256, 512, 1024):
            for causal in (False, True):
                heads = 2 if quick else 8
                batch = max(1, work // (heads * keys * head_dim))
                generator = torch.Generator().manual_seed(keys * head_dim)
                shape = (batch, heads, keys, head_dim)
                tensors = [torch.randn(shape, generator=generator).bfloat16() for _ in range(4)]
                grad = tensors.pop()
                leaves = [t.clone().requires_grad_() for t in tensors]
                _, exact = time_backward(lambda x, causal=causal: fp64(*x, causal), leaves, grad, 0)
                row: dict[str, Any] = {"head_dim": head_dim, "keys": keys, "causal": causal, "batch": batch,
                                       "heads": heads}  # fmt: skip
                for name, attend in ways.items():
                    call = lambda x, attend=attend, causal=causal: attend(*x, causal)  # noqa: E731
                    seconds, grads = time_backward(call, leaves, grad, repeats)
                    row[f"{name}_ms"] = seconds * 1e3
                    row[f"{name}_grad_error"] = relative_error(grads, exact)
                row["bf16_over_fp32"] = row["bf16_ms"] / row["fp32_ms"]
                row["products_allowed_here"] = attention._math_on_this_cpu(*leaves, causal)  # with bf16_products
                row["vlkit_fp32_backward"] = attention._fp32_on_this_cpu(leaves[0]) or (
                    attention._fp32_backward_on_this_cpu(leaves[0], leaves[1])
                )
                rows.append(row)
                print(f"head_dim {head_dim:3d} keys {keys:4d} causal {causal!s:5}: " + ", ".join(
                    f"{name} {row[f'{name}_ms']:6.2f} ms" for name in ways), flush=True)  # fmt: skip
    return rows


def quick_gelu(repeats: int, quick: bool) -> dict[str, Any]:
    shape = (64, 96) if quick else (16 * 197, 3072)
    result: dict[str, Any] = {"shape": list(shape)}
    module = QuickGELU()
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        leaves = [x.clone().requires_grad_()]
        plain, _ = time_backward(lambda t: t[0] * torch.sigmoid(1.702 * t[0]), leaves, grad, repeats)
        ours, _ = time_backward(lambda t: module(t[0]), leaves, grad, repeats)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        result[name] = {"plain_ms": plain * 1e3, "vlkit_ms": ours * 1e3, "speedup": plain / ours}
        print(f"QuickGELU {name}: plain {plain * 1e3:.2f} ms, vlkit {ours * 1e3:.2f} ms", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small grid, one repeat: a smoke test")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    start = time.perf_counter()
    machine = {**ts.cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    machine["amx_fp32_backward_max"] = attention._AMX_FP32_BACKWARD_MAX
    machine["cpu_bf16_attention_slow"] = attention._CPU_BF16_ATTENTION_SLOW
    machine["math_keys_per_channel"] = {
        "causal": attention._MATH_KEYS_PER_CHANNEL_CAUSAL,
        "full": attention._MATH_KEYS_PER_CHANNEL,
    }
    result = {
        "machine": machine,
        "attention": attention_grid(repeats, args.quick),
        "quick_gelu": quick_gelu(repeats, args.quick),
        "quick": args.quick,
    }
    result["wall_s"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
