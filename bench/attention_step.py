"""Whole bf16 training steps with attention as two products against the flash kernel, alternating in one process.

``vlkit.layers.attention.sdpa(..., bf16_products=True)`` runs bf16 training attention without a mask as two bf16
products and a softmax on a CPU without AMX, up to 4 keys per head channel causal and 8 otherwise
(``_MATH_KEYS_PER_CHANNEL*``; per call, ``bench/cpu_kernels.py``). The towers' ``Attention`` and the language model's
``CausalSelfAttention`` ship with it off (their ``bf16_products``); this bench times what turning it on does to whole
steps: ``products`` (both switches on) against ``kernel`` (off: the fp32 flash kernel). Cases:

- ``siglip``: the demo's ``shapes_siglip`` (batch 128, random pixels and right-padded texts, SigLIP loss), eager as
  the trainer runs it; the two settings alternate step by step.
- ``vlm``: the instruct step of a ShapesWorld VLM (``--model``, a recipe run's model directory) on its own
  instruction data, the LM's blocks compiled as the trainer compiles them; a compiled graph keeps the path it was
  traced with, so each switch of setting resets dynamo and recompiles in an untimed pass over the batches, and the
  settings alternate in blocks of ``--batches`` steps.

Both use fused AdamW and bf16 autocast. Writes ``--out`` (JSON: medians, CPU-time medians, speed-up, every step).

    python bench/attention_step.py --case siglip --out bench/results/attention_step_siglip.json
    python bench/attention_step.py --case vlm --model RUN/stages/1-align/model --out OUT.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import train_step as ts
import vlkit
import vlm_step
from vlkit.layers import attention
from vlkit.lm.model import CausalSelfAttention
from vlkit.train.compile import compile_for_training

SETTINGS = ("products", "kernel")


def use(setting: str) -> None:
    attention.Attention.bf16_products = CausalSelfAttention.bf16_products = setting == "products"


def siglip_steps(args: argparse.Namespace) -> tuple[list[Callable[[], None]], dict[str, Any], bool]:
    model = vlkit.create_model("shapes_siglip").train()
    batch = ts.make_shapes_batch(vlkit.registry.get_config("shapes_siglip", {}), args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ts.siglip_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return [step], {"model": "shapes_siglip", "batch_size": args.batch}, False


def vlm_steps(args: argparse.Namespace) -> tuple[list[Callable[[], None]], dict[str, Any], bool]:
    model, recipe, batches = vlm_step.instruct_batches(args.model, args.batches)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    compile_for_training(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    info = {"model": args.model, "recipe": recipe.name, "batch_size": recipe.stages[-1].train.batch_size,
            "padded_lengths": [int(b["input_ids"].shape[1]) for b in batches]}  # fmt: skip
    steps = [lambda batch=batch: vlm_step.train_step(model, optimizer, batch, autocast) for batch in batches]
    return steps, info, True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("siglip", "vlm"), required=True)
    parser.add_argument("--model", help="--case vlm: a ShapesWorld VLM model directory a recipe run wrote")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=4, help="blocks per setting")
    parser.add_argument("--batches", type=int, default=4, help="--case vlm: distinct batches, one block")
    parser.add_argument("--steps", type=int, default=3, help="--case siglip: steps per block")
    parser.add_argument("--batch", type=int, default=128, help="--case siglip: batch size")
    parser.add_argument("--warmup", type=int, default=2, help="--case siglip: untimed steps of each setting first")
    args = parser.parse_args(argv)
    if args.case == "vlm" and not args.model:
        parser.error("--case vlm needs --model")

    steps, info, compiled = (vlm_steps if args.case == "vlm" else siglip_steps)(args)
    block = steps if compiled else steps * args.steps
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for name in SETTINGS if round_index % 2 == 0 else reversed(SETTINGS):
            use(name)
            if compiled:  # the graphs were traced with the other setting's path: trace again, every batch's shape
                torch._dynamo.reset()
                for run in steps:
                    run()
            elif round_index == 0:
                for _ in range(args.warmup):
                    steps[0]()
            for run in block:
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    result = {
        **ts.cpu_description(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "case": args.case,
        **info,
        # False on AMX and AVX2-only CPUs: both settings take the same path there
        "products_in_use": attention._CPU_BF16_ATTENTION_SLOW and attention._CPU_BF16_PRODUCTS,
        "median_s": medians,
        "cpu_median_s": cpu_medians,
        "speedup": medians["kernel"] / medians["products"],
        "speedup_cpu": cpu_medians["kernel"] / cpu_medians["products"],
        "seconds": seconds,
    }
    vlm_step.write_result(args.out, result)


if __name__ == "__main__":
    main()
