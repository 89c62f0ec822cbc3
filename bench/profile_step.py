"""Where a training step's time goes: ``torch.profiler`` over one vlkit training step, per op and per module.

The steps are ``bench/train_step.py``'s (forward, loss, backward, fused AdamW, ``zero_grad``) for ``clip`` (CLIP
ViT-B/16, batch 16), ``shapes`` (``shapes_siglip``, batch 128) and ``convnext`` (ConvNeXt-T classifier, batch 16),
``llava`` (``llava_shapes``' instruct step: ``shapes_llava`` reading the tower's layer 2, tower frozen, the loss at
the targets only, batch 32 of ``LLAVA_LENGTH`` tokens, 64 of them the image's) and ``honeybee`` (``honeybee_c_shapes``'
instead: the C-Abstractor's 16 image tokens, the same text), in fp32 and under bf16 autocast, on the CPU and on CUDA
when there is one.

Attribution. Every op's self time is counted once:

- per op kind, from the op's name (GEMM, SDPA attention kernel, convolution, norms, activations, elementwise,
  reductions/softmax/loss, dtype casts and copies, views and allocation, optimizer kernels, and "framework": time in
  Python, autograd bookkeeping and profiler scopes between the kernels);
- per module group, from ``record_function`` scopes that forward pre/post hooks open around chosen modules (patch
  embedding, attention projections, the attention core, MLP linears and activation, norms, ...) and around the
  phases (forward, loss, backward, optimizer). Backward ops run outside any module; each autograd node carries the
  sequence number of the forward op that created it, so ``evaluate_function: XBackward0`` is charged to the module
  group of that forward op.

On CUDA the times are device (kernel) times of the ops instead of CPU times. Writes ``DIR/<model>_<precision>_<device>
.{md,json}`` and ``DIR/summary.md`` (shares side by side).

    python bench/profile_step.py --out bench/results/profile [--models clip,shapes,convnext,llava,honeybee]
        [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import train_step as ts
import vlkit
from vlkit.layers.attention import Attention, AttentionPool, CrossAttention
from vlkit.layers.mlp import Mlp, SwiGLU
from vlkit.layers.norms import RMSNorm
from vlkit.lm.model import CausalSelfAttention
from vlkit.losses import ClipLoss, SigLipLoss

SCOPE = "vlkit:"  # record_function names: "vlkit:<group>:<module name>" and "vlkit:phase:<phase>"
CUSTOM_OPS = "vlkit::"  # vlkit's custom ops (attention's products), ops like any other
EVALUATE = "autograd::engine::evaluate_function"
OTHER_FORWARD = "other forward (residuals, pooling, casts)"

# Op kinds by name, first match wins; anything else that is an aten op is "other ops", anything else "framework".
KINDS: list[tuple[str, str]] = [
    ("attention kernel (SDPA)", r"scaled_dot_product|flash_attention|efficient_attention|cudnn_attention"),
    ("GEMM", r"^aten::(mm|addmm|bmm|baddbmm|addbmm|addmv|mv|dot|matmul|linear|_addmm_activation)$"),
    ("convolution", r"conv"),
    ("norms", r"layer_norm|group_norm|batch_norm|rms_norm"),
    ("activations", r"^aten::(gelu|silu|sigmoid|tanh|relu|threshold)(_backward)?_?$"),
    ("optimizer kernels", r"_fused_adam|_foreach_|adamw"),
    ("dtype casts and copies", r"^aten::(copy_|_to_copy|to|clone|contiguous|cat|stack|type_as|_unsafe_view)$"),
    (
        "reductions, softmax, loss",
        r"^aten::(sum|mean|amax|max|logsumexp|_?softmax|_?log_softmax|_softmax_backward_data|"
        r"_log_softmax_backward_data|nll_loss\w*|cross_entropy_loss|linalg_vector_norm|norm|log_sigmoid\w*)$",
    ),
    (
        "elementwise",
        r"^aten::(add|sub|rsub|mul|div|neg|exp|log|pow|sqrt|rsqrt|where|masked_fill|fill|zero|addcmul|addcdiv|lerp|"
        r"clamp\w*|abs|eq|ne|lt|gt|le|ge|sign|reciprocal|square|maximum|minimum|ones_like|zeros_like|full|ones|zeros|"
        r"scalar_tensor|arange|tril|triu|embedding_dense_backward|index_put)_?$",
    ),
    (
        "views and allocation",
        r"^aten::(empty\w*|resize_|as_strided\w*|view|_reshape_alias|reshape|transpose|t|permute|expand|unsqueeze|"
        r"squeeze|select|slice|unbind|split|split_with_sizes|chunk|narrow|detach|alias|flatten|unflatten|unfold|"
        r"lift_fresh|resolve_conj|resolve_neg|expand_as|view_as|numpy_T|set_|embedding|index_select|item|"
        r"_local_scalar_dense|is_nonzero|nonzero)_?$",
    ),
]


def op_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other ops" if name.startswith("aten::") else "framework (Python, autograd, scopes)"


def module_groups(model: nn.Module) -> dict[str, str]:
    """Qualified module name -> group, for the modules that get a scope. The patch embedding, norms, embeddings and
    ConvNeXt's downsampling layers are scoped whole; the attention and MLP modules' Linears get their own groups."""
    modules = dict(model.named_modules())
    groups: dict[str, str] = {}
    whole: list[str] = []
    for name, module in modules.items():
        if not name or any(name.startswith(prefix + ".") for prefix in whole):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = modules[name.rsplit(".", 1)[0]] if "." in name else model
        group = None
        if leaf in ("patch_embed", "stem") or (leaf == "downsample" and not isinstance(module, nn.Identity)):
            group = "patch embed / stem" if leaf != "downsample" else "downsample"
            whole.append(name)
        elif name == "bridge":  # a VLM's bridge, whole
            group = "bridge"
            whole.append(name)
        elif isinstance(module, nn.LayerNorm | nn.GroupNorm | RMSNorm):
            group = "norms"
            whole.append(name)
        elif isinstance(module, nn.Embedding) or leaf == "pos_embed":
            group = "embeddings"
            whole.append(name)
        elif isinstance(module, Attention | CrossAttention | AttentionPool | CausalSelfAttention):
            group = "attention core (SDPA, reshapes)"
        elif isinstance(parent, Attention | CrossAttention | AttentionPool | CausalSelfAttention) and isinstance(
            module, nn.Linear
        ):
            group = "attention qkv/out projections"
        elif isinstance(parent, Mlp | SwiGLU) or type(parent).__name__ == "ConvNeXtBlock":
            if isinstance(module, nn.Linear):
                group = "MLP linears"
            elif leaf == "dwconv":
                group = "depthwise conv"
            elif leaf == "act":
                group = "MLP activation"
        elif isinstance(module, nn.Linear):
            group = "heads and projections"
        if group is not None:
            groups[name] = group
    return groups


def add_scopes(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward pre/post hooks that open and close a ``record_function`` scope around each grouped module."""
    stack: list[record_function] = []
    handles = []

    def enter(label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            scope = record_function(label)
            scope.__enter__()
            stack.append(scope)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop().__exit__(None, None, None)

    modules = dict(model.named_modules())
    for name, group in module_groups(model).items():
        handles.append(modules[name].register_forward_pre_hook(enter(f"{SCOPE}{group}:{name}")))
        handles.append(modules[name].register_forward_hook(leave))
    return handles


@contextmanager
def phase(name: str) -> Iterator[None]:
    with record_function(f"{SCOPE}phase:{name}"):
        yield


Forward = Callable[[nn.Module, ts.Batch], Any]
Loss = Callable[[Any, ts.Batch], torch.Tensor]


def dual_forward(model: nn.Module, batch: ts.Batch) -> Any:
    return model(batch["pixels"], batch["input_ids"], batch["attention_mask"])


MODELS: dict[str, tuple[Forward, Loss]] = {
    "clip": (dual_forward, lambda out, _: ClipLoss()(out.image_features, out.text_features, out.logit_scale)),
    "shapes": (
        dual_forward,
        lambda out, _: SigLipLoss()(out.image_features, out.text_features, out.logit_scale, out.logit_bias),
    ),
    "convnext": (lambda model, batch: model(batch["pixels"]), lambda out, batch: F.cross_entropy(out, batch["labels"])),
    # The vlm task's step: the loss alone, the head run at the targets (return_logits=False).
    "llava": (
        lambda model, batch: model(
            batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["labels"], return_logits=False
        ),
        lambda out, _: out.loss,
    ),
}
MODELS["honeybee"] = MODELS["llava"]
# The llava_shapes instruct batches: ~145 tokens padded (64 image tokens, a four-turn conversation), ~130 real, a
# sixth of the positions trained on (bench/results/vlm_step.json measured 142-148, 127-132 and 0.17).
LLAVA_LENGTH, LLAVA_TRAINED = 145, 0.17


def train_step(
    model: nn.Module, forward: Forward, loss_fn: Loss, optimizer: torch.optim.Optimizer, batch: ts.Batch, bf16: bool
) -> None:
    device = batch["pixels"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with phase("forward"):
            out = forward(model, batch)
        with phase("loss"):
            loss = loss_fn(out, batch)
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ts.synchronize(device)


def attribute(events: list[Any], device: torch.device) -> dict[str, Any]:
    """Self times (ms) per op kind, per (module group, phase), per op name and per (group, kind)."""
    cuda = device.type == "cuda"
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    resolved: list[tuple[Any, str | None, str | None, int | None]] = []
    group_of_sequence: dict[int, str] = {}
    for event in cpu_events:
        group, phase_name, evaluated, node = None, None, None, event
        while node is not None:
            if evaluated is None and node.name.startswith(EVALUATE):
                evaluated = node.sequence_nr
            elif node.name.startswith(SCOPE) and not node.name.startswith(CUSTOM_OPS):
                kind, label = node.name[len(SCOPE) :].split(":", 1)
                if kind == "phase":
                    phase_name = phase_name or label
                elif group is None:
                    group = kind
            node = node.cpu_parent
        if group is None and phase_name in ("loss", "optimizer"):
            group = phase_name
        if group is None and phase_name == "forward":
            group = OTHER_FORWARD
        if evaluated is None and phase_name in ("forward", "loss") and event.sequence_nr >= 0:
            group_of_sequence.setdefault(event.sequence_nr, group)
        resolved.append((event, group, phase_name, evaluated))
    kinds: dict[str, float] = defaultdict(float)
    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    group_kinds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    ops: dict[str, dict[str, Any]] = {}
    for event, group, phase_name, evaluated in resolved:
        ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1000
        if evaluated is not None:
            phase_name = "backward"
            group = group_of_sequence.get(evaluated, "backward: grad accumulation")
        elif group is None:
            group = "backward: engine" if phase_name == "backward" else "outside the step"
        kind = op_kind(event.name)
        kinds[kind] += ms
        groups[group][phase_name or "none"] += ms
        group_kinds[group][kind] += ms
        op = ops.setdefault(event.name, {"name": event.name, "kind": kind, "calls": 0, "self_ms": 0.0})
        op["calls"] += 1
        op["self_ms"] += ms
    return {
        "total_ms": sum(kinds.values()),
        "kinds_ms": dict(sorted(kinds.items(), key=lambda item: -item[1])),
        "groups_ms": {g: dict(p) for g, p in sorted(groups.items(), key=lambda item: -sum(item[1].values()))},
        "group_kinds_ms": {g: dict(sorted(k.items(), key=lambda item: -item[1])) for g, k in group_kinds.items()},
        "ops": sorted(ops.values(), key=lambda op: -op["self_ms"]),
    }


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, ts.Batch]:
    torch.manual_seed(0)
    if name == "clip":
        return ts.build_vlkit(args.clip_size), ts.make_batch(
            args.batch, args.clip_size.image_size, args.clip_size.text_len, ts.CLIP_VOCAB
        )
    if name == "shapes":
        model = vlkit.create_model("shapes_siglip")
        return model, ts.make_shapes_batch(model.config, args.shapes_batch)
    if name in ("llava", "honeybee"):
        return _vlm("shapes_llava" if name == "llava" else "shapes_honeybee_c", args.llava_batch)
    size = args.convnext_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.convnext_batch, 3, size.image_size, size.image_size, generator=generator)
    labels = torch.randint(0, size.num_classes, (args.convnext_batch,), generator=generator)
    return ts.build_vlkit_convnext(size), {"pixels": pixels, "labels": labels}


def _vlm(preset: str, batch_size: int) -> tuple[nn.Module, ts.Batch]:
    """``preset`` with random weights reading the tower's layer 2 as the recipes do, its tower frozen as in the
    instruct stage, and a batch shaped like that stage's: the image's placeholder tokens after one prompt token, the
    text of ``LLAVA_LENGTH`` less 64 image tokens, right-padded rows, targets at a sixth of the real positions."""
    model = vlkit.create_model(preset, feature_layer=2)
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    config, generator = model.config, torch.Generator().manual_seed(0)
    image_tokens = model.tokens_per_image()
    length = LLAVA_LENGTH - 64 + image_tokens
    ids = torch.randint(4, config.lm.vocab_size, (batch_size, length), generator=generator)
    ids[:, 1 : 1 + image_tokens] = config.image_token_id
    lengths = torch.randint(length - 30, length + 1, (batch_size,), generator=generator)
    lengths[0] = length
    real = torch.arange(length)[None] < lengths[:, None]
    ids[~real] = config.lm.pad_token_id
    trained = real & (torch.rand(ids.shape, generator=generator) < LLAVA_TRAINED)
    trained[:, : 1 + image_tokens] = False
    size = config.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    return model, {"pixels": pixels, "input_ids": ids, "attention_mask": real.long(),
                   "labels": ids.masked_fill(~trained, -100)}  # fmt: skip


def profile_one(name: str, precision: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    model, batch = build(name, args)
    model = model.to(device).train()
    batch = {key: value.to(device) for key, value in batch.items()}
    optimizer, optimizer_kind = ts.make_optimizer([p for p in model.parameters() if p.requires_grad])
    forward, loss_fn = MODELS[name]
    bf16 = precision == "bf16"
    for _ in range(args.warmup):
        train_step(model, forward, loss_fn, optimizer, batch, bf16)
    start = time.perf_counter()
    train_step(model, forward, loss_fn, optimizer, batch, bf16)  # unprofiled, with the scopes' hooks not yet added
    plain_s = time.perf_counter() - start
    handles = add_scopes(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, forward, loss_fn, optimizer, batch, bf16)
        profiled_s = (time.perf_counter() - start) / args.steps
    for handle in handles:
        handle.remove()
    shares = attribute(list(prof.events()), device)
    per_step = {"total_ms", "kinds_ms", "groups_ms", "group_kinds_ms"}
    for key in per_step - {"total_ms"}:
        shares[key] = _divide(shares[key], args.steps)
    shares["total_ms"] /= args.steps
    for op in shares["ops"]:
        op["self_ms"] /= args.steps
        op["calls"] /= args.steps
    return {
        "model": name,
        "precision": precision,
        "device": str(device),
        "batch": batch["pixels"].shape[0],
        "image_size": batch["pixels"].shape[-1],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer": f"AdamW({optimizer_kind})",
        "threads": torch.get_num_threads(),
        "profiled_steps": args.steps,
        "step_s_unprofiled": plain_s,
        "step_s_profiled": profiled_s,
        "time_basis": "CUDA kernel time" if device.type == "cuda" else "CPU op self time (wall, main thread)",
        **shares,
    }


def _divide(tree: Any, by: int) -> Any:
    return {k: _divide(v, by) for k, v in tree.items()} if isinstance(tree, dict) else tree / by


def to_markdown(result: dict[str, Any], top: int) -> str:
    total = result["total_ms"]
    lines = [
        f"# {result['model']} {result['precision']} on {result['device']}: one training step",
        "",
        f"Batch {result['batch']} at {result['image_size']} px, {result['parameters'] / 1e6:.1f} M parameters, "
        f"{result['optimizer']}, {result['threads']} threads. Step {result['step_s_unprofiled']:.3f} s unprofiled, "
        f"{result['step_s_profiled']:.3f} s profiled; {total:.0f} ms of op self time attributed "
        f"({result['time_basis']}).",
        "",
        "## Per op kind",
        "",
        "| op kind | ms | share |",
        "|---|---:|---:|",
        *(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f} % |" for kind, ms in result["kinds_ms"].items()),
        "",
        "## Per module group (forward + backward; backward ops charged to the module whose forward op made them)",
        "",
        "| module group | forward ms | backward ms | other ms | share | main op kinds |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for group, phases in result["groups_ms"].items():
        forward = phases.get("forward", 0.0) + phases.get("loss", 0.0)
        backward = phases.get("backward", 0.0)
        other = max(sum(phases.values()) - forward - backward, 0.0)
        kinds = result["group_kinds_ms"][group]
        group_total = sum(kinds.values())
        main = ", ".join(f"{k} {100 * v / group_total:.0f} %" for k, v in list(kinds.items())[:3] if group_total)
        lines.append(
            f"| {group} | {forward:.1f} | {backward:.1f} | {other:.1f} | {100 * group_total / total:.1f} % | {main} |"
        )
    lines += ["", f"## Top {top} ops by self time", "", "| op | kind | calls | self ms | share |"]
    lines.append("|---|---|---:|---:|---:|")
    for op in result["ops"][:top]:
        share = 100 * op["self_ms"] / total
        lines.append(f"| `{op['name']}` | {op['kind']} | {op['calls']:.0f} | {op['self_ms']:.1f} | {share:.1f} % |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: list[dict[str, Any]]) -> str:
    names = [f"{r['model']} {r['precision']} {r['device']}" for r in results]
    lines = [
        "# Where a training step goes: shares of op self time",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(results),
        "| step s (unprofiled) | " + " | ".join(f"{r['step_s_unprofiled']:.3f}" for r in results) + " |",
    ]
    for key in ("kinds_ms", "groups_ms"):
        lines += ["", f"| {'op kind' if key == 'kinds_ms' else 'module group'} | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---:|" * len(results))
        labels = list(dict.fromkeys(label for r in results for label in r[key]))
        for label in labels:
            cells = []
            for r in results:
                value = r[key].get(label, 0.0)
                value = sum(value.values()) if isinstance(value, dict) else value
                cells.append(f"{100 * value / r['total_ms']:.1f} %")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the .md and .json files")
    parser.add_argument("--models", default="clip,shapes,convnext")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--devices", default="cpu,cuda", help="cuda is skipped where there is none")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (times are per step)")
    parser.add_argument("--batch", type=int, default=16, help="CLIP batch")
    parser.add_argument("--convnext-batch", type=int, default=16)
    parser.add_argument("--shapes-batch", type=int, default=128)
    parser.add_argument("--llava-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=20, help="rows in the top-ops tables")
    parser.add_argument("--quick", action="store_true", help="tiny models and batches: a smoke test")
    args = parser.parse_args(argv)
    args.clip_size, args.convnext_size = ts.ClipSize(), ts.ConvNeXtSize()
    if args.quick:
        args.clip_size, args.convnext_size = ts.QUICK_CLIP, ts.QUICK_CONVNEXT
        args.batch, args.convnext_batch, args.shapes_batch, args.llava_batch, args.warmup = 2, 2, 8, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for device in devices:
        for name in args.models.split(","):
            for precision in args.precisions.split(","):
                result = profile_one(name, precision, torch.device(device), args)
                result["load_average"] = round(os.getloadavg()[0], 2)
                stem = f"{name}_{precision}_{device}"
                (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
                (args.out / f"{stem}.md").write_text(to_markdown(result, args.top))
                results.append(result)
                print(f"{stem}: {result['step_s_unprofiled']:.3f} s/step, {result['total_ms']:.0f} ms attributed",
                      flush=True)  # fmt: skip
    (args.out / "summary.md").write_text(summary_markdown(results))
    print(summary_markdown(results))


if __name__ == "__main__":
    main()
