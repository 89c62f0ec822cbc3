"""``torch.compile`` of a ShapesWorld training step, eager against compiled.

``--model shapes`` (default): vlkit's ``shapes_siglip`` wrapped whole in ``torch.compile`` (inductor); the SigLIP
loss, backward and the fused AdamW step run as in ``bench/train_step.py``. ``--model llava`` / ``honeybee``: the
``llava_shapes`` / ``honeybee_c_shapes`` instruct step of ``bench/profile_step.py`` (tower frozen, read at layer 2,
batch 32 of 145 tokens), compiled as the trainer compiles it (``vlkit.train.compile``: the LM's decoder blocks only,
dynamic shapes); the variants do not apply there. ``--blocks`` (always for ``--model clip``, the CLIP ViT-B/16 step
of ``bench/train_step.py`` at batch 16): the towers' ``TransformerBlock`` compiled the same way, every block opted
in whatever its width (the library compiles them from 512 wide, after these measurements). Both copies start from
the same initialisation and get the same batch. The compiled copy's first steps are timed on their own
(``compile_s`` = the first compiled step's time minus the eager median: tracing, AOTAutograd's forward and backward
graphs, C++ code generation and its compiler); then eager and compiled steps alternate (who goes first alternating)
and medians of wall and process CPU time are reported, in fp32 and in bf16. ``speedup`` = eager time / compiled
time: above 1 the compiled step is faster.

    python bench/compile_step.py --out bench/results/compile_step.json [--steps 8 --batch 128 --mode default]
    python bench/compile_step.py --model llava --precisions bf16 --out bench/results/compile_step_llava.json
    python bench/compile_step.py --model clip --steps 4 --out bench/results/compile_step_clip_amx.json
    python bench/compile_step.py --model shapes --blocks --variants as_is --out bench/results/compile_blocks_amx.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

import train_step as ts
import vlkit
from vlkit.layers.transformer import TransformerBlock
from vlkit.text.transformer import TextTransformer
from vlkit.train.compile import compile_for_training


@contextmanager
def without_graph_breaks() -> Iterator[None]:
    """Bench-only stand-ins for the two things the text tower does that break its graph under ``torch.compile``.

    ``trim_padding`` cuts the batch to its longest text with ``nonzero`` and ``int()`` (data-dependent shapes), and
    ``pool_index`` checks with ``bool()`` that every text has an end-of-text token. Here both are skipped: the bench
    batch has a full-length text and an end-of-text token in every text, so neither changes anything in it, and both
    copies compute what they did. (A third break, the AMX query of the attention path, which dynamo will not trace,
    was answered here too until the library made it a constant read at import.)
    """
    saved = TextTransformer.trim_padding, TextTransformer.pool_index

    def pool_index(self: TextTransformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        if self.config.pool != "eos":
            return saved[1](self, input_ids, attention_mask)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=1)  # (B,), as pool_index without its check

    TextTransformer.trim_padding = lambda self, input_ids, attention_mask: (input_ids, attention_mask)
    TextTransformer.pool_index = pool_index
    try:
        yield
    finally:
        TextTransformer.trim_padding, TextTransformer.pool_index = saved


MODELS = {"shapes": "shapes_siglip", "clip": ts.MODEL, "llava": "shapes_llava",
          "honeybee": "shapes_honeybee_c"}  # --model -> preset  # fmt: skip


@contextmanager
def transformer_blocks_opted_in() -> Iterator[None]:
    """Every ``TransformerBlock`` (the ViT and text towers' block) opted in to ``compile_for_training``, whatever its
    width: the library compiles only blocks from ``COMPILE_MIN_DIM`` wide (``--blocks``' measurements are why).
    The class's own ``compile_in_training`` property is put back afterwards."""
    saved = TransformerBlock.__dict__["compile_in_training"]
    TransformerBlock.compile_in_training = True  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        TransformerBlock.compile_in_training = saved  # type: ignore[method-assign]


def vlm_loss(model: torch.nn.Module, batch: ts.Batch) -> torch.Tensor:
    return model(
        batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["labels"], return_logits=False
    ).loss


def _steps(args: argparse.Namespace, bf16: bool) -> tuple[ts.TrainStep, ts.TrainStep, ts.Batch]:
    """The eager and the compiled step, from the same initialisation, and the batch."""
    if args.model in ("shapes", "clip"):
        if args.model == "shapes":
            build, loss = (lambda: vlkit.create_model("shapes_siglip")), ts.siglip_loss
            batch = ts.make_shapes_batch(vlkit.registry.get_config("shapes_siglip"), args.batch)
        else:
            build, loss, size = ts.build_vlkit, ts.vlkit_clip_loss, ts.CLIP_SIZE
            batch = ts.make_batch(args.batch, size.image_size, size.text_len, ts.CLIP_VOCAB)
        torch.manual_seed(0)
        eager = ts.TrainStep(build(), loss, bf16, args.device)
        torch.manual_seed(0)
        model = build()
        if args.blocks:
            with transformer_blocks_opted_in():
                compile_for_training(model)
        else:
            model = torch.compile(model, mode=args.mode)
        return eager, ts.TrainStep(model, loss, bf16, args.device), batch
    from profile_step import _vlm

    torch.manual_seed(0)
    model, batch = _vlm(MODELS[args.model], args.batch)
    torch.manual_seed(0)
    twin, _ = _vlm(MODELS[args.model], args.batch)
    compile_for_training(twin)
    return ts.TrainStep(model, vlm_loss, bf16, args.device), ts.TrainStep(twin, vlm_loss, bf16, args.device), batch


def bench_variant(precision: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bf16 = precision == "bf16"
    eager, compiled, batch = _steps(args, bf16)
    batch = {key: value.to(args.device) for key, value in batch.items()}
    with without_graph_breaks() if variant == "no_graph_breaks" else nullcontext():
        eager_first = [eager(batch) for _ in range(args.warmup)]
        compiled_first = [compiled(batch) for _ in range(args.warmup)]
        steps = {"compiled": compiled, "eager": eager}
        times = ts.run_interleaved(steps, batch, args.steps, warmup=0)
    row = ts.compare(steps, times, warmup=args.warmup)
    counters = torch._dynamo.utils.counters
    return {
        "compiled_step_s": row["compiled_step_s"],
        "eager_step_s": row["eager_step_s"],
        "speedup": 1 / row["ratio"],
        "speedup_min": 1 / row["ratio_min"],
        "speedup_cpu_time": 1 / row["ratio_cpu_time"],
        "compile_s": compiled_first[0] - row["eager_step_s"],
        "first_steps_s": {"compiled": compiled_first, "eager": eager_first},
        # Same initialisation and batch: the first losses agree to rounding if the compiled graph computes the same.
        "first_loss": row["first_loss"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": {reason.split("\n")[0]: count for reason, count in counters["graph_break"].items()},
        **{key: row[key] for key in ("compiled_steps_s", "eager_steps_s", "compiled_steps_cpu_s", "eager_steps_cpu_s")},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=tuple(MODELS), default="shapes")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 (shapes), 32 (the VLMs)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and precision")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each, timed apart (compilation)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--variants", default="as_is,no_graph_breaks", help="as_is and/or no_graph_breaks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    blocks = "shapes: compile the towers' blocks as the trainer compiles the LM's, not the whole model; clip: always"
    parser.add_argument("--blocks", action="store_true", help=blocks)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.batch = args.batch or {"shapes": 128, "clip": 16}.get(args.model, 32)
    args.blocks = args.blocks or args.model == "clip"
    if args.model != "shapes":
        args.variants = "as_is"
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {}
    for variant in args.variants.split(","):
        result[variant] = {}
        for precision in args.precisions.split(","):
            row = result[variant][precision] = bench_variant(precision, variant, args)
            print(f"{variant} {precision}: eager {1000 * row['eager_step_s']:.0f} ms, compiled "
              f"{1000 * row['compiled_step_s']:.0f} ms/step: {row['speedup']:.2f}x (min {row['speedup_min']:.2f}x, "
              f"CPU time {row['speedup_cpu_time']:.2f}x); compile {row['compile_s']:.0f} s, {row['graphs']} graphs, "
              f"{sum(row['graph_breaks'].values())} graph breaks", flush=True)  # fmt: skip
    result["config"] = {
        "model": MODELS[args.model],
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "mode": args.mode,
        "compiled": "vlkit.train.compile.compile_for_training: the towers' TransformerBlocks (dynamic shapes), all "
        "opted in"
        if args.blocks
        else "torch.compile(model); loss, backward and AdamW(fused) eager"
        if args.model == "shapes"
        else "vlkit.train.compile.compile_for_training: the LM's decoder blocks (dynamic shapes)",
        "variants": "as_is: the library unchanged; no_graph_breaks: "
        "trim_padding and pool_index's end-of-text check skipped (no-ops on this batch), for eager and compiled alike",
        "bf16": "torch.autocast over forward + loss, fp32 weights",
        "speedup": "eager median / compiled median (wall); _min of the fastest steps; _cpu_time of process CPU time",
    }
    result["machine"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **ts.cpu_description(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
