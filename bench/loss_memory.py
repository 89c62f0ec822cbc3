"""Peak memory and time of the contrastive losses, full-matrix form vs vlkit's chunked / ring forms.

    OMP_NUM_THREADS=1 python bench/loss_memory.py            # global batch 4k, 16k, 32k (minutes)
    OMP_NUM_THREADS=1 python bench/loss_memory.py --quick    # small sizes: checks that it runs

SigLIP and CLIP at embedding dim 768, forward + backward, fp32:
  full  — the plain reference a user would write: the (B, B) logits in one process, autograd does the rest.
  ring2 — vlkit's SigLipLoss / ClipLoss on 2 gloo ranks, each holding B/2 rows (SigLIP passes text blocks around
          the ring in chunks; CLIP gathers the features and scores its rows against all columns).
FILIP at batch 256, 64 image tokens, 16 text tokens, token dim 256 (FILIP's): naive (B x B x N x T scores,
autograd) vs ``FilipLoss`` (text-row chunks, recomputing backward).

Measure: every configuration runs in a fresh process (each rank its own process) with one thread. Peak memory is
the OS's peak resident set (getrusage ru_maxrss) minus the resident set just before the loss is called, when the
inputs (features with requires_grad) and, for ranks, the process group already exist: it is what the loss's
forward and backward add, allocator slack and autograd buffers included, and is exact rather than sampled.
(Large tensors are mmap-backed, so freed memory leaves the resident set and does not inflate later cases.) Time is
the wall time of that one forward + backward; the ring rows report the slowest rank, each rank on one thread.

A full-matrix case whose predicted peak exceeds ``--max-gb`` (all ranks together) is not run: it is recorded as
"OOM/skipped" with the size of its logits matrix and the peak predicted from the bytes-per-logit measured at the
previous size. Writes ``--out`` (JSON) and the markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

EMBED_DIM = 768
FILIP_DIM = 256
GIB = 1024**3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _features(batch: int, dim: int, seed: int, tokens: int | None = None):
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (batch, dim) if tokens is None else (batch, tokens, dim)
    features = torch.randn(shape, generator=generator)
    features /= features.norm(dim=-1, keepdim=True)  # in place: no transient copy before the baseline
    return features.requires_grad_(True)


def _measure(prepare, small: int, batch: int) -> dict[str, float]:
    """Peak bytes added and seconds taken by one forward + backward at ``batch`` in this fresh process.

    ``prepare(batch)`` creates the inputs and returns the step. One step at a small batch runs first, so the
    one-off costs (code pages, thread-local buffers, gloo's first transfers) are not charged to the loss.
    """
    import gc

    prepare(small)()
    gc.collect()
    run = prepare(batch)
    gc.collect()
    baseline, earlier_peak = _rss_bytes(), _peak_bytes()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    # ru_maxrss is a lifetime maximum: if setup peaked above baseline + the loss's peak, this is a lower bound.
    return {"peak_bytes": max(peak - baseline, 0), "seconds": seconds, "lower_bound": peak <= earlier_peak}


def _full_case(loss: str, batch: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    def prepare(size: int):
        image, text = _features(size, EMBED_DIM, 0), _features(size, EMBED_DIM, 1)
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)

        def run() -> None:
            logits = scale * image @ text.T + bias  # (B, B)
            if loss == "siglip":
                signs = 2 * torch.eye(size) - 1
                value = -F.logsigmoid(signs * logits).sum() / size
            else:
                labels = torch.arange(size)
                value = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            value.backward()

        return run

    return _measure(prepare, 64, batch)


def _ring_rank(rank: int, world: int, store: str, loss: str, batch: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    from vlkit.losses import ClipLoss, SigLipLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))  # fmt: skip
    loss_fn = SigLipLoss(chunk_size=1024) if loss == "siglip" else ClipLoss()

    def prepare(size: int):
        local = size // world
        image, text = _features(local, EMBED_DIM, 2 * rank), _features(local, EMBED_DIM, 2 * rank + 1)
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        dist.barrier()  # both ranks start the step together, so the time is the step's, not a wait for the peer
        return lambda: loss_fn(image, text, scale, bias).backward()

    result = _measure(prepare, 64, batch)
    dist.barrier()
    dist.destroy_process_group()
    queue.put((rank, result))


def _ring_case(loss: str, batch: int, world: int = 2) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        store = str(Path(directory) / "store")
        processes = [context.Process(target=_ring_rank, args=(rank, world, store, loss, batch, queue))
                     for rank in range(world)]  # fmt: skip
        for process in processes:
            process.start()
        results = dict(queue.get(timeout=1800) for _ in range(world))
        for process in processes:
            process.join()
    ranks = [results[rank] for rank in range(world)]
    return {
        "peak_bytes": max(r["peak_bytes"] for r in ranks),  # per-rank peak: the worst rank
        "seconds": max(r["seconds"] for r in ranks),
        "lower_bound": any(r["lower_bound"] for r in ranks),
        "per_rank_peak_bytes": [r["peak_bytes"] for r in ranks],
    }


def _filip_case(form: str, batch: int, image_tokens: int, text_tokens: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from vlkit.losses import FilipLoss

    def prepare(size: int):
        image = _features(size, FILIP_DIM, 0, image_tokens)
        text = _features(size, FILIP_DIM, 1, text_tokens)
        lengths = torch.randint(1, text_tokens + 1, (size,), generator=torch.Generator().manual_seed(2))
        text_mask = torch.arange(text_tokens)[None] < lengths[:, None]  # (B, T)
        scale = torch.tensor(10.0, requires_grad=True)

        def naive() -> None:
            scores = torch.einsum("ine,jte->ijnt", image, text)  # (B, B, N, T) at once
            best_text = scores.masked_fill(~text_mask[None, :, None, :], float("-inf")).amax(-1).mean(-1)  # (B, B)
            best_image = scores.amax(-2)  # (B, B, T)
            text_to_image = (best_image * text_mask[None]).sum(-1) / text_mask.sum(-1)[None]
            labels = torch.arange(size)
            value = F.cross_entropy(scale * best_text, labels) + F.cross_entropy(scale * text_to_image.T, labels)
            (value / 2).backward()

        def chunked() -> None:
            FilipLoss(chunk_size=16)(image, text, scale, text_mask=text_mask).backward()

        return naive if form == "naive" else chunked

    return _measure(prepare, 8, batch)


def _worker(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    if case["loss"] == "filip":
        return _filip_case(case["form"], case["batch"], case["image_tokens"], case["text_tokens"])
    if case["form"] == "full":
        return _full_case(case["loss"], case["batch"])
    return _ring_case(case["loss"], case["batch"])


def _run_fresh(case: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--case", json.dumps(case)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"status": f"failed (exit {done.returncode})", "error": done.stderr[-2000:]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def _logit_bytes(case: dict[str, Any]) -> int:
    """fp32 bytes of the largest similarity tensor the form holds at once (per rank for ring2)."""
    batch = case["batch"]
    if case["loss"] == "filip":
        rows = batch if case["form"] == "naive" else 16
        return 4 * batch * rows * case["image_tokens"] * case["text_tokens"]
    if case["form"] == "full":
        return 4 * batch * batch
    local = batch // 2
    return 4 * local * (1024 if case["loss"] == "siglip" else batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss_memory.json")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip cases predicted to need more (all ranks)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_worker(json.loads(args.case))))
        return

    batches = (256, 1024, 2048) if args.quick else (4096, 16384, 32768)
    filip = {"batch": 32, "image_tokens": 16, "text_tokens": 8} if args.quick else {
        "batch": 256, "image_tokens": 64, "text_tokens": 16}  # fmt: skip
    cases = [{"loss": loss, "form": form, "batch": batch}
             for loss in ("siglip", "clip") for form in ("full", "ring2") for batch in batches]  # fmt: skip
    cases += [{"loss": "filip", "form": form, **filip} for form in ("naive", "chunked")]

    rows = []
    bytes_per_logit: dict[tuple[str, str], float] = {}
    for case in cases:
        logit_bytes = _logit_bytes(case)
        ranks = 2 if case["form"] == "ring2" else 1
        factor = bytes_per_logit.get((case["loss"], case["form"]), 8.0)  # peak / (logit tensor bytes), measured
        predicted = factor * logit_bytes * ranks
        if predicted > args.max_gb * GIB:
            result: dict[str, Any] = {"status": "OOM/skipped", "predicted_peak_bytes": predicted / ranks}
        else:
            result = _run_fresh(case)
            if result["status"] == "ok":
                bytes_per_logit[(case["loss"], case["form"])] = result["peak_bytes"] / logit_bytes
        row = {**case, "logit_tensor_bytes": logit_bytes, **result}
        print(json.dumps(row), flush=True)
        rows.append(row)

    for row in rows:  # the target: ring SigLIP per-rank peak as a fraction of the full form's
        if row["form"] in ("ring2", "chunked") and row["status"] == "ok":
            full = next(r for r in rows if r["loss"] == row["loss"] and r["form"] in ("full", "naive")
                        and r.get("batch") == row["batch"])  # fmt: skip
            reference = full.get("peak_bytes", full.get("predicted_peak_bytes"))
            row["fraction_of_full"] = row["peak_bytes"] / reference if reference else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"quick": args.quick, "threads": 1, "embed_dim": EMBED_DIM, "rows": rows},
                                   indent=2) + "\n")  # fmt: skip
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(table)
    print(table)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| loss | form | global batch | largest similarity tensor | peak memory (per rank) | time (s) | vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = (
            row["batch"]
            if row["loss"] != "filip"
            else f"{row['batch']} (N={row['image_tokens']}, T={row['text_tokens']})"
        )
        tensor = f"{row['logit_tensor_bytes'] / GIB:.3f} GiB"
        if row["status"] == "ok":
            bound = " (lower bound)" if row["lower_bound"] else ""
            peak, seconds = f"{row['peak_bytes'] / GIB:.3f} GiB{bound}", f"{row['seconds']:.2f}"
        elif row["status"] == "OOM/skipped":
            peak, seconds = f"OOM/skipped (predicted {row['predicted_peak_bytes'] / GIB:.1f} GiB)", "-"
        else:
            peak, seconds = row["status"], "-"
        fraction = row.get("fraction_of_full")
        lines.append(f"| {row['loss']} | {row['form']} | {size} | {tensor} | {peak} | {seconds} | "
                     f"{'' if fraction is None else f'{fraction:.1%}'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
