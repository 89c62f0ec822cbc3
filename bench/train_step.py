"""One CLIP training step: vlkit's ``clip_vit_base_patch16`` against transformers' ``CLIPModel`` in one process.

A step is forward, contrastive loss, backward and an AdamW step, in fp32 and under bf16 autocast. Both models are
randomly initialised from the same architecture (ViT-B/16 image tower, 12-layer 512-wide causal text tower, 512-d
embedding), get the same batch and the same optimizer (``AdamW(fused=True)`` where the build supports it, else the
for-each implementation, for both). Steps alternate between the two models — and which one goes first alternates
too — so that load from other processes hits both alike; warm-up steps are dropped and medians are reported.
``ratio`` is vlkit time / reference time: below 1 means vlkit is faster.

The same run measures the machine's matmul peak (large square matmuls) and reports vlkit's achieved GFLOP/s from
an analytic FLOP count (``step_flops``). It also times the small ShapesWorld model (``shapes_siglip``) that the
demo recipe trains, since that is where a CPU user spends their minutes.

    python bench/train_step.py --out bench/results/train_step.json [--steps 3 --warmup 1 --batch 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vlkit
from vlkit.losses import ClipLoss, SigLipLoss

EOS_TOKEN = 49407  # CLIP's end-of-text id, also its padding id in vlkit's preset


def make_batch(batch: int, image_size: int, text_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels and right-padded texts: each text ends with an EOS at a random position, padding after it."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
    input_ids = torch.randint(1, vocab - 2, (batch, text_len), generator=generator)
    lengths = torch.randint(text_len // 4, text_len + 1, (batch,), generator=generator)
    lengths[0] = text_len  # at least one full-length text, so every position is exercised
    positions = torch.arange(text_len)[None, :]
    input_ids[positions == (lengths[:, None] - 1)] = vocab - 1
    input_ids[positions >= lengths[:, None]] = vocab - 1
    attention_mask = (positions < lengths[:, None]).long()
    return {"pixels": pixels, "input_ids": input_ids, "attention_mask": attention_mask}


def build_reference(attn_implementation: str) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "eos_token_id": EOS_TOKEN},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu"},
        projection_dim=512,
    )  # fmt: skip
    model = CLIPModel._from_config(config, attn_implementation=attn_implementation)
    for tower in (model.vision_model, model.text_model):
        if tower.config._attn_implementation != attn_implementation:
            raise RuntimeError(f"reference got attention {tower.config._attn_implementation!r}")
    return model


def make_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True), "fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, foreach=True), "foreach"


def make_step(
    model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], bf16: bool
) -> Callable[[dict[str, torch.Tensor]], float]:
    optimizer, _ = make_optimizer(model)

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return elapsed

    return step


def vlkit_clip_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    return ClipLoss()(out.image_features, out.text_features, out.logit_scale)


def reference_clip_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixels"],
        attention_mask=batch["attention_mask"],
        return_loss=True,
    )
    return out.loss


def siglip_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    return SigLipLoss()(out.image_features, out.text_features, out.logit_scale, out.logit_bias)


def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def step_flops(model: nn.Module, batch: int, text_len: int) -> dict[str, float]:
    """Analytic FLOPs of one training step of a vlkit ViT + text dual encoder (multiply-add = 2 FLOPs).

    matmuls:   6 * P * T per tower — 2 P T forward, 4 P T backward (input and weight gradients) — where P counts the
               weights of the tower's Linear layers (patch embedding included, as a (D, C*p*p) matmul) and T the
               tokens they see (B * N for the image blocks, B * N_patches for the patch embedding, B * T_text for
               text blocks, B for the projections and a MAP head's probe).
    attention: 3 * 4 * B * N^2 * D per layer (QK^T and AV, forward + 2x backward), counting the full N x N square
               also for causal text — the work a non-causal kernel would do; the loss is O(B^2 E), negligible.
    Biases, norms, activations, softmax and the optimizer (~15 FLOPs per parameter) are left out; they are memory
    bound and below 1% of the total at ViT-B size.
    """
    image, text = model.image_encoder, model.text_encoder
    grid = image.config.grid
    patches = grid[0] * grid[1]
    image_tokens = patches + image.num_prefix_tokens
    image_blocks = linear_params(image.blocks)
    text_blocks = linear_params(text.blocks)
    head = linear_params(image.head) if image.head is not None else 0
    projections = linear_params(model.image_projection) + linear_params(model.text_projection)
    patch_embed = image.patch_embed.proj.weight.numel()
    matmul = 6 * (
        image_blocks * batch * image_tokens
        + patch_embed * batch * patches
        + text_blocks * batch * text_len
        + (head + projections) * batch
    )
    attention = 12 * batch * (
        image.config.depth * image_tokens**2 * image.config.dim + text.config.depth * text_len**2 * text.config.dim
    )
    return {"matmul": float(matmul), "attention": float(attention), "total": float(matmul + attention)}


def matmul_peak_gflops(dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    """Best of ``repeats`` square matmuls; best (not median) because other load on the machine only slows it."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def run_interleaved(
    steps: dict[str, Callable[[dict[str, torch.Tensor]], float]],
    batch: dict[str, torch.Tensor],
    num_steps: int,
    warmup: int,
) -> dict[str, list[float]]:
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + num_steps):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            elapsed = steps[name](batch)
            if index >= warmup:
                times[name].append(elapsed)
    return times


def bench_clip(args: argparse.Namespace, precision: str, reference_attn: str) -> dict[str, Any]:
    torch.manual_seed(0)
    vlkit_model = vlkit.create_model("clip_vit_base_patch16").train()
    torch.manual_seed(0)
    reference_model = build_reference(reference_attn).train()
    batch = make_batch(args.batch, args.image_size, args.text_len, vlkit_model.config.text.vocab_size)
    bf16 = precision == "bf16"
    times = run_interleaved(
        {
            "vlkit": make_step(vlkit_model, vlkit_clip_loss, bf16),
            "reference": make_step(reference_model, reference_clip_loss, bf16),
        },
        batch,
        args.steps,
        args.warmup,
    )
    vlkit_s, reference_s = statistics.median(times["vlkit"]), statistics.median(times["reference"])
    ratios = [a / b for a, b in zip(times["vlkit"], times["reference"], strict=True)]
    return {
        "vlkit_step_s": vlkit_s,
        "reference_step_s": reference_s,
        "ratio": vlkit_s / reference_s,
        "ratio_of_paired_steps_median": statistics.median(ratios),
        "vlkit_steps_s": times["vlkit"],
        "reference_steps_s": times["reference"],
    }


def bench_shapes(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vlkit.create_model("shapes_siglip").train()
    config = model.config
    generator = torch.Generator().manual_seed(0)
    text_len = config.text.max_seq_len
    batch = {
        "pixels": torch.randn(args.shapes_batch, 3, 64, 64, generator=generator),
        "input_ids": torch.randint(3, config.text.vocab_size, (args.shapes_batch, text_len), generator=generator),
        "attention_mask": torch.ones(args.shapes_batch, text_len, dtype=torch.long),
    }
    step = make_step(model, siglip_loss, precision == "bf16")
    times = [step(batch) for _ in range(args.shapes_warmup + args.shapes_steps)][args.shapes_warmup :]
    seconds = statistics.median(times)
    flops = step_flops(model, args.shapes_batch, text_len)["total"]
    return {"vlkit_step_s": seconds, "vlkit_steps_s": times, "gflop_per_step": flops / 1e9,
            "gflops_achieved": flops / seconds / 1e9}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--reference-attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes-batch", type=int, default=128)
    parser.add_argument("--shapes-steps", type=int, default=10)
    parser.add_argument("--shapes-warmup", type=int, default=3)
    parser.add_argument("--no-shapes", action="store_true")
    args = parser.parse_args()
    if args.image_size != 224:
        parser.error("the CLIP reference has fixed 224 px position embeddings; --image-size must be 224")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    flops = step_flops(vlkit.create_model("clip_vit_base_patch16"), args.batch, args.text_len)
    _, optimizer_kind = make_optimizer(nn.Linear(2, 2))
    result: dict[str, Any] = {}
    for precision in args.precisions.split(","):
        result[precision] = bench_clip(args, precision, args.reference_attn)
        print(f"{precision}: done after {time.perf_counter() - started:.0f} s", flush=True)
    # Peaks again after the long run: other processes come and go, keep the best of both measurements.
    peaks = {key: max(value, matmul_peak_gflops(torch.float32 if key == "fp32" else torch.bfloat16, repeats=2))
             for key, value in peaks.items()}  # fmt: skip
    shapes = {} if args.no_shapes else {p: bench_shapes(args, p) for p in args.precisions.split(",")}

    result["config"] = {
        "model": "clip_vit_base_patch16",
        "reference": "transformers.CLIPModel (same architecture, random init, return_loss=True)",
        "reference_attn_implementation": args.reference_attn,
        "batch": args.batch,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "texts": "random ids, EOS at a random position >= text_len/4 (one full-length), right-padded, attention_mask",
        "steps": args.steps,
        "warmup": args.warmup,
        "optimizer": f"torch.optim.AdamW({optimizer_kind}), same for both",
        "bf16": "torch.autocast('cpu', dtype=torch.bfloat16), fp32 master weights",
        "ratio": "vlkit_step_s / reference_step_s (medians); < 1 means vlkit is faster",
        "flop_formula": step_flops.__doc__,
    }
    result["machine"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "bf16_matmul_peak_gflops": peaks["bf16"],
        "fp32_matmul_peak_gflops": peaks["fp32"],
        "peak_method": "best of several 4096x4096 @ 4096x4096 matmuls, measured before and after the steps",
    }
    result["gflop_per_step"] = flops["total"] / 1e9
    result["gflop_per_step_parts"] = {key: value / 1e9 for key, value in flops.items()}
    result["vlkit_gflops_achieved"] = {
        p: flops["total"] / result[p]["vlkit_step_s"] / 1e9 for p in args.precisions.split(",")
    }
    result["reference_gflops_achieved"] = {
        p: flops["total"] / result[p]["reference_step_s"] / 1e9 for p in args.precisions.split(",")
    }
    if shapes:
        result["shapes_siglip"] = {"batch": args.shapes_batch, "image_size": 64, "text_len": 32, **shapes}
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, args.precisions.split(","))


def print_table(result: dict[str, Any], precisions: list[str]) -> None:
    machine = result["machine"]
    print(f"\nclip_vit_base_patch16 train step, batch {result['config']['batch']}, torch {machine['torch']}, "
          f"{machine['threads']} threads, {result['gflop_per_step']:.0f} GFLOP/step")  # fmt: skip
    header = f"{'precision':<9} {'vlkit s':>8} {'ref s':>8} {'ratio':>6} {'vlkit GFLOP/s':>14} {'peak':>7} {'% peak':>7}"
    print(header)
    print("-" * len(header))
    for p in precisions:
        row = result[p]
        achieved = result["vlkit_gflops_achieved"][p]
        peak = machine[f"{p}_matmul_peak_gflops"]
        print(f"{p:<9} {row['vlkit_step_s']:>8.2f} {row['reference_step_s']:>8.2f} {row['ratio']:>6.3f} "
              f"{achieved:>14.1f} {peak:>7.1f} {100 * achieved / peak:>6.1f}%")  # fmt: skip
    if "shapes_siglip" in result:
        shapes = result["shapes_siglip"]
        for p in precisions:
            row = shapes[p]
            print(f"shapes_siglip {p} (batch {shapes['batch']}): {1000 * row['vlkit_step_s']:.0f} ms/step, "
                  f"{row['gflops_achieved']:.1f} GFLOP/s")  # fmt: skip
    print(f"wall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
