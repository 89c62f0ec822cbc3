"""Many ShapesWorld training runs at once: each line of a runs file is ``NAME RECIPE [vlkit train options]``.

Runs go to ``OUT/NAME`` through ``vlkit train`` (``--device`` is added to each), ``--parallel`` at a time, longest
first as listed; ``OUT/sweep.json`` collects every run's periodic evaluations (seen / held-out zero-shot top-1 and
image -> text R@1) and final metrics, and is rewritten as runs finish, so an interrupted sweep still leaves its
numbers. On one GPU the ShapesWorld model is launch-bound, so several runs share it well (20 at once on an H100).

    python bench/shapes_sweep.py --runs bench/shapes_sweep_h100.txt --out runs/sweep --device cuda --parallel 8
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def read_runs(path: Path) -> list[tuple[str, list[str]]]:
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if len(words) < 2:
            raise SystemExit(f"{path}:{number}: expected 'NAME RECIPE [options]', got {line!r}")
        name, recipe, *options = words
        runs.append((name, ["--recipe", recipe, *options]))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: run names repeat")
    return runs


def summarise(run_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"evals": {}}
    log = run_dir / "log.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if "eval" in record:
                metrics = record["eval"]
                keys = ("zero_shot_top1", "zero_shot_top1_heldout", "retrieval_i2t_r1")
                row["evals"][record["step"]] = [round(metrics.get(key, float("nan")), 4) for key in keys]
            elif "loss" in record:
                row["last_step"], row["last_loss"] = record["step"], record["loss"]
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        keys = ("zero_shot_top1", "zero_shot_top1_heldout", "retrieval_i2t_r1", "retrieval_t2i_r1", "train_seconds")
        row["final"] = {key: metrics[key] for key in keys if key in metrics}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    args = parser.parse_args()
    runs = read_runs(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def write_summary() -> dict[str, Any]:
        summary = {name: summarise(args.out / name) for name, _ in runs}
        (args.out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def train(run: tuple[str, list[str]]) -> tuple[str, int]:
        name, options = run
        command = [sys.executable, "-m", "vlkit", "train", *options, "--out", str(args.out / name),
                   "--device", args.device, "--quiet"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with open(args.out / f"{name}.log", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
        write_summary()
        print(f"{name}: exit {code} at {time.perf_counter() - started:.0f} s", flush=True)
        return name, code

    with ThreadPoolExecutor(args.parallel) as pool:
        failed = [name for name, code in pool.map(train, runs) if code]
    for name, row in write_summary().items():
        print(name, row.get("last_step"), row.get("final", {}), row["evals"])
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see OUT/NAME.log)")


if __name__ == "__main__":
    main()
