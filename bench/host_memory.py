"""Page faults and step time with glibc's default thresholds against ``vlkit.train.host_memory.keep_freed_memory``.

The setting is process-wide and stays, so every measurement runs in its own child process, the two settings
alternating (default first in the first round, kept first in the second, ...). A child times training steps as the
trainer runs them (``bench/profile_step.py``'s models and batches, with the modules the trainer compiles compiled):
``honeybee`` is ``honeybee_c_shapes``' instruct step (tower frozen and read at layer 2, batch 32 of 97 tokens, the
LM's blocks compiled), ``shapes`` ``shapes_siglip``'s step at batch 128, ``clip`` vlkit's CLIP ViT-B/16 at batch 16
(its 768- and 512-wide blocks compiled); under bf16 autocast (``--precision``) with fused AdamW. Per child: the
median and fastest step (wall), the median CPU time, the minor page faults per step and the peak resident memory.
``speedup`` = default median / kept median, per round and over all rounds.

    python bench/host_memory.py --out bench/results/host_memory_amx.json [--models honeybee,shapes --rounds 2]
    python bench/host_memory.py --models clip --steps 6 --warmup 3 --out bench/results/host_memory_amx_clip.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import profile_step as ps
import train_step as ts


def child(model_name: str, keep: bool, precision: str, steps: int, warmup: int, quick: bool) -> dict[str, Any]:
    """Time ``steps`` training steps of ``model_name`` in this process, with the thresholds set first if ``keep``."""
    from vlkit.train.compile import compile_for_training
    from vlkit.train.host_memory import keep_freed_memory

    applied = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    sizes = argparse.Namespace(clip_size=ts.QUICK_CLIP if quick else ts.ClipSize(), batch=2 if quick else 16,
                               shapes_batch=8 if quick else 128, llava_batch=2 if quick else 32)  # fmt: skip
    model, batch = ps.build(model_name, sizes)
    compile_for_training(model)  # the modules the trainer compiles (the LM's blocks, towers from 512 wide)
    model.train()
    optimizer, _ = ts.make_optimizer([p for p in model.parameters() if p.requires_grad])
    forward, loss_fn = ps.MODELS[model_name]
    bf16 = precision == "bf16"
    for _ in range(warmup):
        ps.train_step(model, forward, loss_fn, optimizer, batch, bf16)
    wall, cpu, faults = [], [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu_start, start = time.process_time(), time.perf_counter()
        ps.train_step(model, forward, loss_fn, optimizer, batch, bf16)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {
        "model": model_name,
        "keep_freed_memory": keep,
        "applied": applied,
        "median_s": statistics.median(wall),
        "fastest_s": min(wall),
        "median_cpu_s": statistics.median(cpu),
        "faults_per_step": statistics.median(faults),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="honeybee,shapes", help="comma-separated: honeybee, shapes, clip")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of child processes per model")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small batches, 2 steps, 1 round: a smoke test")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    if args.child:
        print(json.dumps(child(args.child, args.keep, args.precision, args.steps, args.warmup, args.quick)))
        return

    results: dict[str, Any] = {**ts.cpu_description(), "threads": args.threads, "torch": torch.__version__,
                               "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
                               "quick": args.quick, "models": {}}  # fmt: skip
    for model_name in args.models.split(","):
        runs = []
        for round_ in range(args.rounds):
            for keep in (False, True) if round_ % 2 == 0 else (True, False):
                command = [sys.executable, __file__, "--out", str(args.out), "--child", model_name,
                           "--precision", args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--threads", str(args.threads)] + ["--keep"] * keep + ["--quick"] * args.quick  # fmt: skip
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                run = json.loads(output.strip().splitlines()[-1])
                run["round"] = round_
                runs.append(run)
                summary = f"{run['faults_per_step']:.0f} faults/step, peak {run['peak_rss_mb']:.0f} MB"
                print(f"{model_name} round {round_} keep={keep}: {run['median_s'] * 1e3:.1f} ms, {summary}", flush=True)
        default = [run["median_s"] for run in runs if not run["keep_freed_memory"]]
        kept = [run["median_s"] for run in runs if run["keep_freed_memory"]]
        results["models"][model_name] = {
            "runs": runs,
            "speedup_per_round": [d / k for d, k in zip(default, kept, strict=True)],
            "speedup": statistics.median(default) / statistics.median(kept),
        }
        print(f"{model_name}: speedup {results['models'][model_name]['speedup']:.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
