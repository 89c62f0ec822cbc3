"""One CLIP training step: vlkit's ``clip_vit_base_patch16`` against transformers' ``CLIPModel`` in one process.

A step is forward, contrastive loss, backward and an AdamW step, in fp32 and under bf16 autocast (fp32 master
weights). Both models are randomly initialised from the same architecture (ViT-B/16 image tower, 12-layer 512-wide
causal text tower, 512-d embedding; 149.6 M parameters each), get the same batch and the same optimizer
(``AdamW(fused=True)`` where this build supports it, else the for-each implementation, for both). Steps alternate
between the two models, and which one goes first alternates too, so that load from other processes hits both
alike; warm-up steps are dropped and medians are reported. ``ratio`` is vlkit time / reference time: below 1 means
vlkit is faster.

The same run measures the machine's matmul peak (large square matmuls) and reports achieved GFLOP/s from an
analytic FLOP count (``step_flops``). It also times the small ShapesWorld model (``shapes_siglip``) that the demo
recipe trains: on a CPU that is where a user spends their minutes.

    python bench/train_step.py --out bench/results/train_step.json [--steps 3 --warmup 1 --batch 16 --threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vlkit
from vlkit.layers.patch_embed import PatchEmbed
from vlkit.losses import ClipLoss, SigLipLoss

MODEL = "clip_vit_base_patch16"
Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def make_batch(batch: int, image_size: int, text_len: int, vocab: int, seed: int = 0) -> Batch:
    """Random pixels and right-padded texts: each ends with an EOS (the last id, CLIP's 49407) at a random position,
    padding (the same id, as OpenAI's tokenizer pads) after it, and an attention mask."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
    input_ids = torch.randint(1, vocab - 2, (batch, text_len), generator=generator)
    lengths = torch.randint(text_len // 4, text_len + 1, (batch,), generator=generator)
    lengths[0] = text_len  # one full-length text, so every position is used
    positions = torch.arange(text_len)[None, :]  # (1, T)
    input_ids[positions >= lengths[:, None] - 1] = vocab - 1
    attention_mask = (positions < lengths[:, None]).long()
    return {"pixels": pixels, "input_ids": input_ids, "attention_mask": attention_mask}


def build_vlkit(image_size: int) -> nn.Module:
    return vlkit.create_model(MODEL, **{"vision.image_size": image_size})


def build_reference(image_size: int, attn_implementation: str) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "eos_token_id": 49407},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": image_size, "patch_size": 16,
                       "hidden_act": "quick_gelu"},
        projection_dim=512,
    )  # fmt: skip
    model = CLIPModel._from_config(config, attn_implementation=attn_implementation)
    for tower in (model.vision_model, model.text_model):
        if tower.config._attn_implementation != attn_implementation:
            raise RuntimeError(f"the reference got attention {tower.config._attn_implementation!r}")
    return model


def vlkit_clip_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    return ClipLoss()(out.image_features, out.text_features, out.logit_scale)


def reference_clip_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixels"],
        attention_mask=batch["attention_mask"],
        return_loss=True,
    )
    return out.loss


def siglip_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    return SigLipLoss()(out.image_features, out.text_features, out.logit_scale, out.logit_bias)


def make_optimizer(params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, str]:
    try:
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True), "fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, foreach=True), "foreach"


class TrainStep:
    """forward + loss + backward + AdamW step; each call returns its wall time and records the process CPU time
    (all threads) and minor page faults of the step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, bf16: bool, device: torch.device) -> None:
        self.model = model.to(device).train()
        self.device = device
        self.loss_fn = loss_fn
        self.bf16 = bf16
        self.optimizer, self.optimizer_kind = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.minor_faults: list[int] = []
        self.cpu_s: list[float] = []
        self.losses: list[float] = []

    def __call__(self, batch: Batch) -> float:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu_start = time.process_time()
        synchronize(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.cpu_s.append(time.process_time() - cpu_start)
        self.minor_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        self.losses.append(loss.item())
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return elapsed


def linear_params(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def stem_weight_positions(stem: nn.Module, image_size: int) -> int:
    """Sum over the stem's convolutions of weights x output positions for one image: the patch embedding is one
    convolution (a (D, 3*p*p) matmul per patch), a conv stem several, each at its own resolution."""
    if isinstance(stem, PatchEmbed):  # its Conv2d holds the weight but the forward is a matmul: no hook fires
        return stem.proj.weight.numel() * (image_size // stem.patch_size) ** 2
    counts: list[int] = []
    hooks = [
        conv.register_forward_hook(lambda m, _, out: counts.append(m.weight.numel() * out.shape[-2] * out.shape[-1]))
        for conv in stem.modules()
        if isinstance(conv, nn.Conv2d)
    ]
    device = next(stem.parameters()).device
    with torch.no_grad():
        stem(torch.zeros(1, 3, image_size, image_size, device=device))
    for hook in hooks:
        hook.remove()
    return sum(counts)


def step_flops(model: nn.Module, batch: int, text_len: int) -> dict[str, float]:
    """Analytic FLOPs of one training step of a vlkit ViT + text dual encoder (a multiply-add is 2 FLOPs).

    matmuls:   6 * P * T summed over the parts of the model: 2 P T forward, 4 P T backward (input and weight
               gradients), P = weights of the part's Linear layers, T = tokens they see: B * N for the image blocks
               (N patches + class token), B * T_text for the text blocks, B for a MAP head's probe and the
               projections; for each convolution of the patch embedding or conv stem, P = its weights and T = B x its
               output positions. For ViT-B/16 + the CLIP text tower this
               is ~6 x 149.6 M params x tokens, without the 25 M token-embedding parameters (a lookup).
    attention: 3 * 4 * B * N^2 * D per layer (QK^T and AV: 2 * 2 * N^2 * D forward, twice that backward), with the
               full N x N square also for causal text, the work a non-causal kernel does.
    Left out: biases, norms, activations, softmax, the loss (O(B^2 E)) and the optimizer (~15 FLOPs/parameter):
    memory bound and together < 1 % of the total at ViT-B size.
    """
    image, text = model.image_encoder, model.text_encoder
    grid = image.config.grid
    patches = grid[0] * grid[1]
    image_tokens = patches + image.num_prefix_tokens
    matmul = 6 * (
        linear_params(image.blocks) * batch * image_tokens
        + stem_weight_positions(image.patch_embed, image.config.image_size) * batch
        + linear_params(text.blocks) * batch * text_len
        + (linear_params(image.head) + linear_params(model.image_projection) + linear_params(model.text_projection))
        * batch
    )
    image_attention = image.config.depth * image_tokens**2 * image.config.dim
    text_attention = text.config.depth * text_len**2 * text.config.dim
    attention = 12 * batch * (image_attention + text_attention)
    return {"matmul": float(matmul), "attention": float(attention), "total": float(matmul + attention)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, size: int = 4096, repeats: int = 3) -> float:
    """Best of ``repeats`` square matmuls: best, not median, because other load on the machine only slows it."""
    if device.type == "cuda":
        size, repeats = 8192, 10
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def run_interleaved(steps: dict[str, TrainStep], batch: Batch, num_steps: int, warmup: int) -> dict[str, list[float]]:
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + num_steps):
        for name in names if index % 2 == 0 else names[::-1]:
            elapsed = steps[name](batch)
            if index >= warmup:
                times[name].append(elapsed)
    return times


def bench_clip(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    torch.manual_seed(0)
    vlkit_model = build_vlkit(args.image_size)
    torch.manual_seed(0)
    reference_model = build_reference(args.image_size, args.reference_attn)
    batch = make_batch(args.batch, args.image_size, args.text_len, vlkit_model.config.text.vocab_size)
    batch = {key: value.to(args.device) for key, value in batch.items()}
    bf16 = precision == "bf16"
    steps = {
        "vlkit": TrainStep(vlkit_model, vlkit_clip_loss, bf16, args.device),
        "reference": TrainStep(reference_model, reference_clip_loss, bf16, args.device),
    }
    times = run_interleaved(steps, batch, args.steps, args.warmup)
    vlkit_s, reference_s = statistics.median(times["vlkit"]), statistics.median(times["reference"])
    cpu = {name: step.cpu_s[args.warmup :] for name, step in steps.items()}
    return {
        "vlkit_step_s": vlkit_s,
        "reference_step_s": reference_s,
        "ratio": vlkit_s / reference_s,
        # Load from other processes only ever slows a step down: the fastest steps and the CPU time are the
        # least disturbed views, and a ratio that agrees across all three is one to trust.
        "ratio_paired_median": statistics.median(
            a / b for a, b in zip(times["vlkit"], times["reference"], strict=True)
        ),
        "ratio_min": min(times["vlkit"]) / min(times["reference"]),
        "ratio_cpu_time": statistics.median(cpu["vlkit"]) / statistics.median(cpu["reference"]),
        "vlkit_steps_s": times["vlkit"],
        "reference_steps_s": times["reference"],
        "vlkit_steps_cpu_s": cpu["vlkit"],
        "reference_steps_cpu_s": cpu["reference"],
        "first_loss": {"vlkit": steps["vlkit"].losses[0], "reference": steps["reference"].losses[0]},
        "minor_page_faults_per_step": {
            name: statistics.median(step.minor_faults[args.warmup :]) for name, step in steps.items()
        },
    }


def bench_shapes(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vlkit.create_model("shapes_siglip")
    config = model.config
    generator = torch.Generator().manual_seed(0)
    batch_size, text_len, image_size = args.shapes_batch, config.text.max_seq_len, config.vision.image_size
    lengths = torch.randint(4, text_len + 1, (batch_size,), generator=generator)
    positions = torch.arange(text_len)[None, :]
    input_ids = torch.randint(3, config.text.vocab_size, (batch_size, text_len), generator=generator)
    input_ids[positions == lengths[:, None] - 1] = config.text.eos_token_id  # each text ends with end-of-text
    input_ids[positions >= lengths[:, None]] = config.text.pad_token_id
    batch = {
        "pixels": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": (positions < lengths[:, None]).long(),
    }
    batch = {key: value.to(args.device) for key, value in batch.items()}
    step = TrainStep(model, siglip_loss, precision == "bf16", args.device)
    times = [step(batch) for _ in range(args.shapes_warmup + args.shapes_steps)][args.shapes_warmup :]
    seconds = statistics.median(times)
    flops = step_flops(model, batch_size, text_len)["total"]
    return {
        "vlkit_step_s": seconds,
        "vlkit_steps_s": times,
        "gflops_achieved": flops / seconds / 1e9,
        "minor_page_faults_per_step": statistics.median(step.minor_faults[args.shapes_warmup :]),
    }


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
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--shapes-batch", type=int, default=128)
    parser.add_argument("--shapes-steps", type=int, default=8)
    parser.add_argument("--shapes-warmup", type=int, default=2)
    parser.add_argument("--no-shapes", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU run also times CUDA-synchronised steps)")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.image_size % 16:
        parser.error("--image-size must be a multiple of the 16 px patch")
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    started = time.perf_counter()
    load_before = os.getloadavg()

    peaks = {
        key: matmul_peak_gflops(dtype, args.device)
        for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    flops = step_flops(build_vlkit(args.image_size), args.batch, args.text_len)
    result: dict[str, Any] = {}
    for precision in precisions:
        result[precision] = bench_clip(args, precision)
        row = result[precision]
        print(f"{precision}: vlkit {row['vlkit_step_s']:.2f} s, reference {row['reference_step_s']:.2f} s "
              f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)  # fmt: skip
    shapes = {} if args.no_shapes else {precision: bench_shapes(args, precision) for precision in precisions}
    # The peaks again at the end: other processes come and go, so keep the best of both measurements.
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[key] = max(peaks[key], matmul_peak_gflops(dtype, args.device, repeats=2))

    _, optimizer_kind = make_optimizer([nn.Parameter(torch.zeros(2))])
    result["config"] = {
        "model": MODEL,
        "reference": "transformers.CLIPModel, same architecture (CLIPConfig, patch_size=16), random init, "
        "return_loss=True",
        "reference_attn_implementation": args.reference_attn,
        "vlkit_attention": "F.scaled_dot_product_attention",
        "batch": args.batch,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "texts": "random ids, EOS at a random position (one text full length), right-padded, attention_mask given",
        "steps": args.steps,
        "warmup": args.warmup,
        "optimizer": f"torch.optim.AdamW({optimizer_kind}), the same for both",
        "bf16": f"torch.autocast('{args.device.type}', dtype=torch.bfloat16) over forward + loss; fp32 weights and "
        "optimizer",
        "device": str(args.device),
        "timing": "wall time per step, vlkit and reference steps interleaved (order alternating), medians; "
        "ratio_min from the fastest steps, ratio_cpu_time from median process CPU time (all threads)",
        "ratio": "vlkit_step_s / reference_step_s; < 1 means vlkit is faster",
        "flop_formula": " ".join(step_flops.__doc__.split()),
    }
    result["machine"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "bf16_matmul_peak_gflops": peaks["bf16"],
        "fp32_matmul_peak_gflops": peaks["fp32"],
        "peak_method": "best of several 4096 x 4096 @ 4096 x 4096 matmuls, before and after the steps",
    }
    result["gflop_per_step"] = flops["total"] / 1e9
    result["gflop_per_step_parts"] = {key: value / 1e9 for key, value in flops.items()}
    result["vlkit_gflops_achieved"] = {p: flops["total"] / result[p]["vlkit_step_s"] / 1e9 for p in precisions}
    result["reference_gflops_achieved"] = {p: flops["total"] / result[p]["reference_step_s"] / 1e9 for p in precisions}
    if shapes:
        model = vlkit.create_model("shapes_siglip")
        result["shapes_siglip"] = {
            "batch": args.shapes_batch,
            "image_size": model.config.vision.image_size,
            "text_len": model.config.text.max_seq_len,
            "gflop_per_step": step_flops(model, args.shapes_batch, model.config.text.max_seq_len)["total"] / 1e9,
            **shapes,
        }
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, precisions)


def print_table(result: dict[str, Any], precisions: list[str]) -> None:
    machine, config = result["machine"], result["config"]
    print(f"\n{MODEL} train step, batch {config['batch']}, {config['image_size']} px, torch {machine['torch']}, "
          f"{machine['threads']} threads, {result['gflop_per_step']:.0f} GFLOP/step")  # fmt: skip
    header = (
        f"{'precision':<9} {'vlkit s':>8} {'ref s':>8} {'ratio':>6} {'min':>6} {'cpu':>6} "
        f"{'vlkit GFLOP/s':>14} {'peak':>7} {'%peak':>6}"
    )
    print(header)
    print("-" * len(header))
    for p in precisions:
        row = result[p]
        achieved = result["vlkit_gflops_achieved"][p]
        peak = machine[f"{p}_matmul_peak_gflops"]
        print(f"{p:<9} {row['vlkit_step_s']:>8.2f} {row['reference_step_s']:>8.2f} {row['ratio']:>6.3f} "
              f"{row['ratio_min']:>6.3f} {row['ratio_cpu_time']:>6.3f} "
              f"{achieved:>14.1f} {peak:>7.1f} {100 * achieved / peak:>5.1f}%")  # fmt: skip
    if "shapes_siglip" in result:
        shapes = result["shapes_siglip"]
        for p in precisions:
            row = shapes[p]
            share = 100 * row["gflops_achieved"] / machine[f"{p}_matmul_peak_gflops"]
            print(f"shapes_siglip {p:<4} batch {shapes['batch']}: {1000 * row['vlkit_step_s']:6.0f} ms/step, "
                  f"{row['gflops_achieved']:6.1f} GFLOP/s ({share:.0f}% of peak)")  # fmt: skip
    print("ratio = vlkit / reference of median wall times (< 1: vlkit faster); min: of fastest steps; cpu: of median")
    print("process CPU times. GFLOP/s and %peak: vlkit, median wall time.")
    print(f"load average before/after {machine['load_average_before_after']}, wall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
