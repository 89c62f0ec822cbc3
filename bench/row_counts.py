"""What a new row count costs a bf16 product on this CPU: the training products' shapes, one count against many.

oneDNN, which runs PyTorch's bf16 products on a CPU, builds a kernel for every shape it meets (JIT-compiled for AMX
tiles) and caches 1024 of them. The language model's unpadded training gives its products a row count that changes
with every batch, so vlkit rounds the count up (``ROW_MULTIPLE`` in ``vlkit.lm.model``). This script times a bf16
linear layer's forward and backward (autocast, as training runs it) over ``--counts`` steps, each pass in the same
process one after another:

- ``one_count``: every step at the middle row count;
- ``new_counts``: every step at a count drawn from ``--low``-``--high``, none met before;
- ``same_counts_again``: the same counts once more (their kernels cached now, while the cache holds them);
- ``rounded``: new counts rounded up to ``--multiple``.

    python bench/row_counts.py --out bench/results/row_counts.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train_step import cpu_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="the layer's input features (the LM's width)")
    parser.add_argument("--features", type=int, default=1024, help="its output features")
    parser.add_argument("--counts", type=int, default=200, help="steps per pass")
    parser.add_argument("--low", type=int, default=2000)
    parser.add_argument("--high", type=int, default=3000)
    parser.add_argument("--multiple", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/row_counts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(args.features, args.width, requires_grad=True)
    draw = random.Random(0)
    # Distinct counts that are not multiples of --multiple, so that "rounded" meets only the shapes it makes itself.
    pool = [n for n in range(args.low, args.high + 1) if n % args.multiple]
    new, later = (draw.sample(pool, args.counts) for _ in range(2))
    rounded = [-(-n // args.multiple) * args.multiple for n in later]

    def run(counts: list[int]) -> float:
        start = time.perf_counter()
        for rows in counts:
            x = torch.randn(rows, args.width, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = F.linear(x, weight)
            out.float().sum().backward()
        return time.perf_counter() - start

    middle = (args.low + args.high) // 2
    run([middle] * 10)  # warm-up
    seconds = {
        "one_count": run([middle] * args.counts),
        "new_counts": run(new),
        "same_counts_again": run(new),
        "rounded": run(rounded),
    }
    result = {
        **cpu_description(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "layer": [args.features, args.width],
        "counts": args.counts,
        "rows": [args.low, args.high],
        "multiple": args.multiple,
        "distinct_rounded": len(set(rounded)),
        "seconds": seconds,
        "new_counts_over_one_count": seconds["new_counts"] / seconds["one_count"],
        "rounded_over_one_count": seconds["rounded"] / seconds["one_count"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
