"""Which packed layout oneDNN's decoding products run fastest on: the rows a weight is laid out for.

vlkit's CPU inference multiplies by packed copies of the linear weights (``vlkit.layers.linear``), laid out by oneDNN
for a number of rows given when packing (``_PACK_BATCH_HINT``); any number of rows then runs on that layout. This
script packs the linear weights of bench/generate.py's 55 M Qwen2-style decoder (8 layers of QKV 768 x 512, output
512 x 512, gate-up 2816 x 512, down 512 x 1408, and the 32000 x 512 head: 156 MB, more than the caches hold, as in
decoding) for each layout and runs all of them back to back at 1, 4, 8 and 16 rows. The layouts alternate within each
repeat, so a drift of the machine's load or memory bandwidth hits them alike; best of ``--repeats``. It writes the
milliseconds of one pass over every product per layout and row count.

    python bench/pack_layout.py --out bench/results/pack_layout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from train_step import cpu_description

SHAPES = [(768, 512), (512, 512), (2816, 512), (512, 1408)] * 8 + [(32000, 512)]  # (out, in)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="8,64,256,1024", help="rows to lay the weights out for, comma-separated")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/pack_layout.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layouts = [int(n) for n in args.layouts.split(",")]
    weights = [torch.randn(out, inp) for out, inp in SHAPES]
    packed = {n: [torch.ops.mkldnn._reorder_linear_weight(w, n) for w in weights] for n in layouts}
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for rows in (int(n) for n in args.rows.split(",")):
            inputs = {width: torch.randn(rows, width) for width in {w.shape[1] for w in weights}}
            best = dict.fromkeys(layouts, float("inf"))
            for _ in range(args.repeats):
                for layout in layouts:
                    start = time.perf_counter()
                    for weight, copy in zip(weights, packed[layout], strict=True):
                        torch.ops.mkldnn._linear_pointwise(inputs[weight.shape[1]], copy, None, "none", [], "")
                    best[layout] = min(best[layout], time.perf_counter() - start)
            results[f"rows{rows}"] = {f"layout{n}_ms": round(best[n] * 1e3, 2) for n in layouts}
            print(f"{rows} rows: {results[f'rows{rows}']}", flush=True)
    machine = cpu_description()
    report = {
        "cpu": machine["cpu_model"],
        "cpu_flags": machine["cpu_flags"],
        "amx": machine["amx"],
        "threads": args.threads,
        "torch": torch.__version__,
        "weights_mb": round(sum(w.numel() * 4 for w in weights) / 1e6, 1),
        "repeats": args.repeats,
        "ms_per_pass": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
