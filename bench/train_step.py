"""One training step, vlkit against transformers at the same configuration, in one process run.

Three models, each step = forward, loss, backward and an AdamW step, in fp32 and under bf16 autocast (fp32 master
weights):

- ``clip``: vlkit's ``clip_vit_base_patch16`` against transformers' ``CLIPModel`` (ViT-B/16 image tower, 12-layer
  512-wide causal text tower, 512-d embedding; 149.6 M parameters each), CLIP loss, batch 16.
- ``convnext``: vlkit's ``convnext_tiny`` classifier against transformers' ``ConvNextForImageClassification``
  (depths 3-3-9-3, widths 96-768, 28.6 M parameters each), cross-entropy over 1000 classes, batch 16.
- ``shapes``: the small ShapesWorld model the demo trains (``shapes_siglip``, SigLIP loss, batch 128), vlkit only,
  its fp32 step against its bf16 step.

Both models of a pair are randomly initialised, get the same batch and the same optimizer (``AdamW(fused=True)``
where this build supports it, else the for-each implementation, for both). Steps alternate between the two models
(for ``shapes``: between fp32 and bf16), and which one goes first alternates too, so that load from other processes
hits both alike; warm-up steps are dropped and medians are reported, with the ratio of the process CPU times beside
the ratio of the wall times. ``ratio`` is vlkit time / reference time: below 1 means vlkit is faster.

Peak memory per step: each library's steps run again in a subprocess of their own (one per library, glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so freed tensors go back to the OS at once and the resident set follows
the live tensors). After a warm-up step (AdamW allocates its state there) and ``malloc_trim``, the resident set is
the baseline; the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and one step runs; the peak above
the baseline is the step's activations, gradients and temporaries. On CUDA it is ``max_memory_allocated`` above
``memory_allocated`` after ``reset_peak_memory_stats``.

The matmul peak is the best of several large square products at two sizes, in fp32 and bf16, measured before and
after the steps (the best of both kept): load from other processes only slows a product down.

    python bench/train_step.py --out bench/results/train_step.json [--steps 3 --warmup 1 --threads N]
    python bench/train_step.py --out /tmp/quick.json --quick      # tiny sizes, one step: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import vlkit
from vlkit.layers.patch_embed import PatchEmbed
from vlkit.losses import ClipLoss, SigLipLoss
from vlkit.train.compile import AUTO_MIN_STEPS, compile_for_training, compile_targets, resolve_compile
from vlkit.train.host_memory import keep_freed_memory

MODEL = "clip_vit_base_patch16"
CLIP_VOCAB = 49408
MIB = 2**20
Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class ClipSize(NamedTuple):
    """The CLIP geometry both libraries are built with (MLP width 4x, QuickGELU, patch 16)."""

    image_size: int = 224
    vision_dim: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    text_dim: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_len: int = 77
    embed_dim: int = 512


class ConvNeXtSize(NamedTuple):
    image_size: int = 224
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    num_classes: int = 1000


CLIP_SIZE = ClipSize()  # ViT-B/16 at 224 px, the 12-layer 512-wide text tower
QUICK_CLIP = ClipSize(image_size=32, vision_dim=32, vision_depth=2, vision_heads=2, text_dim=32, text_depth=2,
                      text_heads=2, text_len=16, embed_dim=24)  # fmt: skip
QUICK_CONVNEXT = ConvNeXtSize(image_size=32, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)


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


def make_shapes_batch(config: Any, batch_size: int, seed: int = 0) -> Batch:
    """Random pixels and right-padded texts for a ShapesWorld model's config, each text ending with end-of-text; one
    text is full length, so trimming the padding never changes the shapes a step sees."""
    generator = torch.Generator().manual_seed(seed)
    text_len, image_size = config.text.max_seq_len, config.vision.image_size
    lengths = torch.randint(4, text_len + 1, (batch_size,), generator=generator)
    lengths[0] = text_len
    positions = torch.arange(text_len)[None, :]
    input_ids = torch.randint(3, config.text.vocab_size, (batch_size, text_len), generator=generator)
    input_ids[positions == lengths[:, None] - 1] = config.text.eos_token_id
    input_ids[positions >= lengths[:, None]] = config.text.pad_token_id
    return {
        "pixels": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": (positions < lengths[:, None]).long(),
    }


def build_vlkit(size: ClipSize | int = CLIP_SIZE) -> nn.Module:
    size = ClipSize(image_size=size) if isinstance(size, int) else size
    return vlkit.create_model(MODEL, **{
        "vision.image_size": size.image_size, "vision.dim": size.vision_dim, "vision.depth": size.vision_depth,
        "vision.num_heads": size.vision_heads, "vision.mlp_dim": 4 * size.vision_dim, "text.dim": size.text_dim,
        "text.depth": size.text_depth, "text.num_heads": size.text_heads, "text.mlp_dim": 4 * size.text_dim,
        "text.max_seq_len": size.text_len, "embed_dim": size.embed_dim,
    })  # fmt: skip


def build_reference(size: ClipSize | int = CLIP_SIZE, attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    size = ClipSize(image_size=size) if isinstance(size, int) else size
    config = CLIPConfig(
        text_config={"hidden_size": size.text_dim, "intermediate_size": 4 * size.text_dim,
                     "num_hidden_layers": size.text_depth, "num_attention_heads": size.text_heads,
                     "max_position_embeddings": size.text_len, "hidden_act": "quick_gelu", "eos_token_id": 49407},
        vision_config={"hidden_size": size.vision_dim, "intermediate_size": 4 * size.vision_dim,
                       "num_hidden_layers": size.vision_depth, "num_attention_heads": size.vision_heads,
                       "image_size": size.image_size, "patch_size": 16, "hidden_act": "quick_gelu"},
        projection_dim=size.embed_dim,
    )  # fmt: skip
    model = CLIPModel._from_config(config, attn_implementation=attn_implementation)
    for tower in (model.vision_model, model.text_model):
        if tower.config._attn_implementation != attn_implementation:
            raise RuntimeError(f"the reference got attention {tower.config._attn_implementation!r}")
    return model


def build_vlkit_convnext(size: ConvNeXtSize) -> nn.Module:
    return vlkit.create_model("convnext_tiny", **{
        "vision.image_size": size.image_size, "vision.depths": size.depths, "vision.dims": size.dims,
        "num_classes": size.num_classes,
    })  # fmt: skip


def build_reference_convnext(size: ConvNeXtSize) -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        depths=list(size.depths), hidden_sizes=list(size.dims), image_size=size.image_size, drop_path_rate=0.0,
        layer_scale_init_value=1e-6, num_labels=size.num_classes, problem_type="single_label_classification",
    )  # fmt: skip
    return ConvNextForImageClassification(config)


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


def vlkit_classify_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["pixels"]), batch["labels"])


def reference_classify_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(pixel_values=batch["pixels"], labels=batch["labels"]).loss


def make_optimizer(params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, str]:
    try:
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True), "fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, foreach=True), "foreach"


class Case(NamedTuple):
    """One model of the bench: a builder and a loss per library, and the batch they all get. (NamedTuples, not
    dataclasses, so that tests can load this file as a module without registering it.)"""

    build: dict[str, Callable[[], nn.Module]]
    loss: dict[str, LossFn]
    batch: Callable[[], Batch]
    batch_size: int
    flops: Callable[[nn.Module], float]


def as_trained(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """vlkit's model as its trainer runs a long run of it: the modules it compiles in training compiled
    (``TrainConfig.compile="auto"`` at ``AUTO_MIN_STEPS`` steps: on CPU, wide tower blocks), unless
    ``--vlkit-compile off``. The compilation falls in the warm-up steps."""
    if args.vlkit_compile == "auto" and resolve_compile("auto", model, args.device, AUTO_MIN_STEPS):
        compile_for_training(model)
    return model


def compiled(model: nn.Module) -> bool:
    return any("forward" in module.__dict__ for module in compile_targets(model))


def make_cases(args: argparse.Namespace) -> dict[str, Case]:
    clip, convnext = args.clip_size, args.convnext_size

    def convnext_batch() -> Batch:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(args.convnext_batch, 3, convnext.image_size, convnext.image_size, generator=generator)
        labels = torch.randint(0, convnext.num_classes, (args.convnext_batch,), generator=generator)
        return {"pixels": pixels, "labels": labels}

    def shapes_flops(model: nn.Module) -> float:
        return step_flops(model, args.shapes_batch, model.config.text.max_seq_len)["total"]

    def convnext_flops(model: nn.Module) -> float:
        return conv_linear_step_flops(model, convnext.image_size, args.convnext_batch)

    cases = {
        "clip": Case(
            build={"vlkit": lambda: as_trained(build_vlkit(clip), args),
                   "reference": lambda: build_reference(clip, args.reference_attn)},
            loss={"vlkit": vlkit_clip_loss, "reference": reference_clip_loss},
            batch=lambda: make_batch(args.batch, clip.image_size, clip.text_len, CLIP_VOCAB),
            batch_size=args.batch,
            flops=lambda model: step_flops(model, args.batch, clip.text_len)["total"],
        ),
        "convnext": Case(
            build={"vlkit": lambda: as_trained(build_vlkit_convnext(convnext), args),
                   "reference": lambda: build_reference_convnext(convnext)},
            loss={"vlkit": vlkit_classify_loss, "reference": reference_classify_loss},
            batch=convnext_batch,
            batch_size=args.convnext_batch,
            flops=convnext_flops,
        ),
        "shapes": Case(
            build={"vlkit": lambda: as_trained(vlkit.create_model("shapes_siglip"), args)},
            loss={"vlkit": siglip_loss},
            batch=lambda: make_shapes_batch(vlkit.registry.get_config("shapes_siglip", {}), args.shapes_batch),
            batch_size=args.shapes_batch,
            flops=shapes_flops,
        ),
    }  # fmt: skip
    return {name: cases[name] for name in args.cases}


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


def conv_linear_step_flops(model: nn.Module, image_size: int, batch: int) -> float:
    """6 x the multiply-adds of every Conv2d and Linear in one image's forward, x B: 2 forward, 4 backward (the
    depthwise 7x7 convolutions count their C x 49 weights per output position). Norms, GELU and the optimizer are
    left out; at ConvNeXt-T they are memory bound, and the depthwise convolutions too, so the GFLOP/s it gives is a
    lower bound on how busy the matmul units are, not a share of the peak to aim for."""
    macs: list[int] = []

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        positions = out.shape[-2] * out.shape[-1] if isinstance(module, nn.Conv2d) else out.numel() // out.shape[-1]
        macs.append(module.weight.numel() * positions)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    for hook in hooks:
        hook.remove()
    return 6.0 * sum(macs) * batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peaks(device: torch.device, sizes: tuple[int, ...], repeats: int) -> dict[str, dict[str, float]]:
    """GFLOP/s of square matmuls per dtype and size: the best of ``repeats`` after a warm-up product, into a
    preallocated output (no page faults in the timed call). Best, not median: other load only slows it."""
    result: dict[str, dict[str, float]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[name] = {}
        for size in sizes:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            out = torch.mm(a, b)
            best = float("inf")
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                torch.mm(a, b, out=out)
                synchronize(device)
                best = min(best, time.perf_counter() - start)
            result[name][str(size)] = 2 * size**3 / best / 1e9
    return result


def run_interleaved(steps: dict[str, TrainStep], batch: Batch, num_steps: int, warmup: int) -> dict[str, list[float]]:
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + num_steps):
        for name in names if index % 2 == 0 else names[::-1]:
            elapsed = steps[name](batch)
            if index >= warmup:
                times[name].append(elapsed)
    return times


def compare(steps: dict[str, TrainStep], times: dict[str, list[float]], warmup: int) -> dict[str, Any]:
    """Medians of two interleaved step series ``a`` and ``b`` (the order of ``steps``) and their ratios a / b."""
    a, b = steps
    cpu = {name: step.cpu_s[warmup:] for name, step in steps.items()}
    row: dict[str, Any] = {}
    for name in steps:
        row[f"{name}_step_s"] = statistics.median(times[name])
        row[f"{name}_cpu_s"] = statistics.median(cpu[name])
    row.update({
        "ratio": row[f"{a}_step_s"] / row[f"{b}_step_s"],
        # Load from other processes only ever slows a step down: the fastest steps and the CPU time are the
        # least disturbed views, and a ratio that agrees across all three is one to trust.
        "ratio_paired_median": statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)),
        "ratio_min": min(times[a]) / min(times[b]),
        "ratio_cpu_time": row[f"{a}_cpu_s"] / row[f"{b}_cpu_s"],
    })  # fmt: skip
    for name in steps:
        row[f"{name}_steps_s"] = times[name]
        row[f"{name}_steps_cpu_s"] = cpu[name]
    row["first_loss"] = {name: step.losses[0] for name, step in steps.items()}
    row["minor_page_faults_per_step"] = {
        name: statistics.median(step.minor_faults[warmup:]) for name, step in steps.items()
    }
    return row


def bench_pair(case: Case, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """vlkit against the reference, interleaved, in one precision."""
    steps: dict[str, TrainStep] = {}
    params: dict[str, int] = {}
    for library in ("vlkit", "reference"):
        torch.manual_seed(0)
        model = case.build[library]()
        params[library] = sum(p.numel() for p in model.parameters())
        steps[library] = TrainStep(model, case.loss[library], precision == "bf16", args.device)
    batch = {key: value.to(args.device) for key, value in case.batch().items()}
    row = compare(steps, run_interleaved(steps, batch, args.steps, args.warmup), args.warmup)
    row["gflops_achieved"] = {
        library: case.flops(steps["vlkit"].model) / row[f"{library}_step_s"] / 1e9 for library in steps
    }
    return {**row, "parameters": params, "vlkit_compiled": compiled(steps["vlkit"].model)}


def bench_shapes(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """The same shapes_siglip initialisation in fp32 and in bf16, steps interleaved."""
    steps: dict[str, TrainStep] = {}
    for precision in args.precisions:
        torch.manual_seed(0)
        steps[precision] = TrainStep(case.build["vlkit"](), case.loss["vlkit"], precision == "bf16", args.device)
    batch = {key: value.to(args.device) for key, value in case.batch().items()}
    times = run_interleaved(steps, batch, args.shapes_steps, args.shapes_warmup)
    flops = case.flops(steps[args.precisions[0]].model)
    result: dict[str, Any] = {}
    for precision, step in steps.items():
        seconds = statistics.median(times[precision])
        result[precision] = {
            "vlkit_step_s": seconds,
            "vlkit_cpu_s": statistics.median(step.cpu_s[args.shapes_warmup :]),
            "vlkit_steps_s": times[precision],
            "vlkit_steps_cpu_s": step.cpu_s[args.shapes_warmup :],
            "gflops_achieved": flops / seconds / 1e9,
            "minor_page_faults_per_step": statistics.median(step.minor_faults[args.shapes_warmup :]),
        }
    if set(steps) == {"fp32", "bf16"}:
        both = compare({p: steps[p] for p in ("bf16", "fp32")}, times, args.shapes_warmup)
        keys = ("ratio", "ratio_paired_median", "ratio_min", "ratio_cpu_time")
        result["bf16_over_fp32"] = {key: both[key] for key in keys}  # > 1: bf16 is the slower
    return {"gflop_per_step": flops / 1e9, **result}


# --- Peak memory, in a subprocess per library (see the module docstring).


def _proc_status_kib(name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


def _resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _proc_status_kib("VmRSS") * 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status_kib("VmHWM") * 1024


def probe_memory(case: Case, library: str, precision: str, device: torch.device) -> dict[str, float]:
    empty = _resident_bytes(device)
    torch.manual_seed(0)
    step = TrainStep(case.build[library](), case.loss[library], precision == "bf16", device)
    batch = {key: value.to(device) for key, value in case.batch().items()}
    step(batch)  # warm-up: AdamW allocates its state, oneDNN its primitives
    state = _resident_bytes(device)
    _reset_peak(device)
    step(batch)
    peak = _peak_bytes(device)
    return {"step_peak_mib": (peak - state) / MIB, "state_mib": (state - empty) / MIB, "peak_mib": (peak - empty) / MIB}


def memory_probe_main(args: argparse.Namespace, library: str) -> None:
    if library == "reference":  # imported before the first baseline, so no case's state counts the modules
        from transformers import CLIPModel, ConvNextForImageClassification  # noqa: F401
    result = {
        name: {precision: probe_memory(case, library, precision, args.device) for precision in args.precisions}
        for name, case in make_cases(args).items()
        if library in case.build
    }
    print("MEMORY " + json.dumps(result))


def measure_memory(argv: list[str], library: str) -> dict[str, dict[str, dict[str, float]]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", library]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe for {library} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("MEMORY "))


def add_memory(result: dict[str, Any], memory: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    for name in args.cases:
        for precision in args.precisions:
            rows = {lib: memory[lib][name][precision] for lib in memory if name in memory[lib]}
            target = result[name][precision]
            target["memory"] = rows
            if "reference" in rows:
                target["memory_ratio"] = rows["vlkit"]["step_peak_mib"] / rows["reference"]["step_peak_mib"]


# --- Machine description.


# Process settings that move both libraries' step times (bench/README.md, "Reading the numbers").
MEMORY_ENV = ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "LD_PRELOAD")  # fmt: skip


def cpu_description() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    flags: set[str] = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "cpu_model": model,
        "cpu_flags": {flag: flag in flags for flag in wanted},
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # The kernel's transparent-huge-page mode ([brackets] = active) and this process's MEMORY_ENV variables.
        "transparent_hugepage": thp.read_text().strip() if thp.exists() else None,
        "memory_env": {name: os.environ[name] for name in MEMORY_ENV if name in os.environ},
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny models, one step each: a smoke test")
    parser.add_argument("--cases", default="clip,convnext,shapes")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="CLIP batch")
    parser.add_argument("--image-size", type=int, default=224, help="CLIP image size")
    parser.add_argument("--convnext-batch", type=int, default=16)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--reference-attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--shapes-batch", type=int, default=128)
    parser.add_argument("--shapes-steps", type=int, default=8)
    parser.add_argument("--shapes-warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--vlkit-compile",
        default="auto",
        choices=["auto", "off"],
        help="auto: compile what vlkit's trainer compiles in a long run (wide tower blocks on CPU)",
    )
    parser.add_argument(
        "--keep-freed-memory",
        default="on",
        choices=["on", "off"],
        help="on: glibc keeps freed memory in the process, as vlkit's trainer sets it (both libraries: one process)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU run also times CUDA-synchronised steps)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.cases = args.cases.split(",")
    args.precisions = args.precisions.split(",")
    if unknown := set(args.cases) - {"clip", "convnext", "shapes"}:
        parser.error(f"unknown cases {sorted(unknown)}")
    if args.image_size % 16:
        parser.error("--image-size must be a multiple of the 16 px patch")
    args.clip_size, args.convnext_size = ClipSize(image_size=args.image_size), ConvNeXtSize()
    args.peak_sizes, args.peak_repeats = ((8192, 4096), 10) if args.device.type == "cuda" else ((4096, 2048), 5)
    if args.quick:
        args.clip_size, args.convnext_size = QUICK_CLIP, QUICK_CONVNEXT
        args.batch, args.convnext_batch, args.shapes_batch = 2, 2, 8
        args.steps, args.warmup, args.shapes_steps, args.shapes_warmup = 1, 1, 1, 1
        args.peak_sizes, args.peak_repeats = (256, 128), 2
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe_main(args, args.memory_probe)
        return
    kept = keep_freed_memory() if args.keep_freed_memory == "on" else False
    started = time.perf_counter()
    load_before = os.getloadavg()
    peaks_before = matmul_peaks(args.device, args.peak_sizes, args.peak_repeats)
    cases = make_cases(args)
    result: dict[str, Any] = {}
    for name, case in cases.items():
        if name == "shapes":
            result[name] = bench_shapes(case, args)
            continue
        result[name] = {"batch": case.batch_size}
        for precision in args.precisions:
            row = result[name][precision] = bench_pair(case, precision, args)
            print(f"{name} {precision}: vlkit {row['vlkit_step_s']:.3f} s, reference {row['reference_step_s']:.3f} s "
                  f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)  # fmt: skip
    if not args.no_memory:
        libraries = ("vlkit", "reference") if set(args.cases) - {"shapes"} else ("vlkit",)
        add_memory(result, {library: measure_memory(argv, library) for library in libraries}, args)
    # The peaks again at the end: other processes come and go, so keep the best of both measurements.
    peaks_after = matmul_peaks(args.device, args.peak_sizes, args.peak_repeats)
    peaks = {p: max(max(peaks_before[p].values()), max(peaks_after[p].values())) for p in peaks_before}

    _, optimizer_kind = make_optimizer([nn.Parameter(torch.zeros(2))])
    result["config"] = {
        "quick": args.quick,
        "clip": {"model": MODEL, **args.clip_size._asdict(), "batch": args.batch,
                 "reference": "transformers.CLIPModel, same architecture (CLIPConfig, patch_size=16), random init, "
                              "return_loss=True", "reference_attn_implementation": args.reference_attn,
                 "texts": "random ids, EOS at a random position (one text full length), right-padded, "
                          "attention_mask given"},
        "convnext": {"model": "convnext_tiny", **args.convnext_size._asdict(), "batch": args.convnext_batch,
                     "reference": "transformers.ConvNextForImageClassification (ConvNextConfig), random init, "
                                  "labels= (its cross-entropy); vlkit: F.cross_entropy"},
        "shapes": {"model": "shapes_siglip", "batch": args.shapes_batch, "steps": args.shapes_steps,
                   "warmup": args.shapes_warmup, "loss": "SigLipLoss", "timing": "fp32 and bf16 steps interleaved"},
        "steps": args.steps,
        "warmup": args.warmup,
        "vlkit_compile": f"{args.vlkit_compile}: the modules vlkit's trainer compiles in a run of {AUTO_MIN_STEPS} "
        "steps or more (TrainConfig.compile='auto'), compiled in vlkit's model; the compilation falls in the warm-up",
        "optimizer": f"torch.optim.AdamW({optimizer_kind}), the same for both",
        "keep_freed_memory": f"{args.keep_freed_memory} (applied: {kept}); on: glibc's mmap and trim thresholds "
        "raised as vlkit's trainer raises them (vlkit.train.host_memory), for the whole process, so for both libraries",
        "bf16": f"torch.autocast('{args.device.type}', dtype=torch.bfloat16) over forward + loss; fp32 weights and "
        "optimizer",
        "device": str(args.device),
        "timing": "wall time per step, vlkit and reference steps interleaved (order alternating), medians; "
        "ratio_min from the fastest steps, ratio_cpu_time from median process CPU time (all threads)",
        "ratio": "vlkit_step_s / reference_step_s; < 1 means vlkit is faster",
        "memory": "step_peak_mib: peak above the resident state after a warm-up step (weights, AdamW state, batch), "
        "one subprocess per library, MALLOC_MMAP_THRESHOLD_=131072, VmHWM reset via /proc/self/clear_refs (CUDA: "
        "max_memory_allocated); state_mib: that state above the process before the model was built; "
        "memory_ratio: vlkit / reference step_peak_mib",
        "flop_formula": " ".join(step_flops.__doc__.split()),
        "convnext_flop_formula": " ".join(conv_linear_step_flops.__doc__.split()),
    }  # fmt: skip
    result["machine"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        **cpu_description(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "bf16_matmul_peak_gflops": peaks["bf16"],
        "fp32_matmul_peak_gflops": peaks["fp32"],
        "matmul_peaks_gflops": {"before": peaks_before, "after": peaks_after},
        "peak_method": f"best of {args.peak_repeats} square matmuls (sizes {list(args.peak_sizes)}) into a "
        "preallocated output, before and after the steps; the best over sizes and both runs",
    }
    for name in set(cases) - {"shapes"}:
        for precision in args.precisions:
            row = result[name][precision]
            row["pct_of_peak"] = {lib: 100 * g / peaks[precision] for lib, g in row["gflops_achieved"].items()}
    if "shapes" in cases:
        for precision in args.precisions:
            row = result["shapes"][precision]
            row["pct_of_peak"] = 100 * row["gflops_achieved"] / peaks[precision]
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result, args)


def print_tables(result: dict[str, Any], args: argparse.Namespace) -> None:
    machine = result["machine"]
    peaks = f"{machine['fp32_matmul_peak_gflops']:.0f} (fp32) / {machine['bf16_matmul_peak_gflops']:.0f} (bf16)"
    print(f"\n{machine['cpu_model']}, torch {machine['torch']}, {machine['threads']} threads, peak {peaks} GFLOP/s")
    header = (
        f"{'model':<9} {'prec':<5} {'vlkit s':>8} {'ref s':>8} {'ratio':>6} {'min':>6} {'cpu':>6} "
        f"{'vlkit MiB':>9} {'ref MiB':>8} {'GFLOP/s':>8} {'%peak':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in (n for n in args.cases if n != "shapes"):  # name*: vlkit's model compiled as its trainer compiles it
        for p in args.precisions:
            row = result[name][p]
            memory = row.get("memory", {})
            mib = [f"{memory[lib]['step_peak_mib']:.0f}" if lib in memory else "-" for lib in ("vlkit", "reference")]
            label = f"{name}*" if row.get("vlkit_compiled") else name
            print(f"{label:<9} {p:<5} {row['vlkit_step_s']:>8.3f} {row['reference_step_s']:>8.3f} {row['ratio']:>6.3f} "
                  f"{row['ratio_min']:>6.3f} {row['ratio_cpu_time']:>6.3f} {mib[0]:>9} {mib[1]:>8} "
                  f"{row['gflops_achieved']['vlkit']:>8.1f} {row['pct_of_peak']['vlkit']:>5.1f}%")  # fmt: skip
    if "shapes" in result:
        shapes = result["shapes"]
        for p in args.precisions:
            row = shapes[p]
            mib = row.get("memory", {}).get("vlkit", {}).get("step_peak_mib")
            print(f"shapes_siglip {p:<4} batch {args.shapes_batch}: {1000 * row['vlkit_step_s']:6.0f} ms/step, "
                  f"CPU {row['vlkit_cpu_s']:.2f} s, {row['gflops_achieved']:6.1f} GFLOP/s ({row['pct_of_peak']:.0f}% "
                  f"of peak), step peak {mib if mib is None else round(mib)} MiB")  # fmt: skip
        if "bf16_over_fp32" in shapes:
            r = shapes["bf16_over_fp32"]
            print(f"shapes_siglip bf16 / fp32 step time: wall {r['ratio']:.3f}, min {r['ratio_min']:.3f}, "
                  f"cpu {r['ratio_cpu_time']:.3f}")  # fmt: skip
    print("ratio = vlkit / reference of median wall times (< 1: vlkit faster); min: of fastest steps; cpu: of median")
    print("process CPU times. MiB: peak per step above the state after warm-up. GFLOP/s and %peak: vlkit, median wall.")
    print("model*: vlkit's model with what its trainer compiles in a long run compiled (--vlkit-compile off: none)")
    print(f"load average before/after {machine['load_average_before_after']}, wall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
