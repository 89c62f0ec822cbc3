"""``torch.compile`` where it pays: the modules a model marks as worth compiling, in training only.

A module opts in with ``compile_in_training``, a class attribute or a property (the decoder LM's block: its RoPE,
SwiGLU, RMSNorm and residual chain is a dozen memory-bound elementwise passes that inductor fuses, measured by
``bench/compile_step.py --model llava``; the towers' ``TransformerBlock`` from 512 wide, ``--model clip``).
``compile_for_training(model)`` routes each such module's forward, while the module trains with gradients on,
through one compiled function per class (shared by every instance, so a 4-block LM compiles once), with dynamic
shapes so that batches of other lengths reuse the graph. Evaluation and generation (eval mode, no gradients, a KV
cache) keep the eager forward. It returns the undo, which the trainer calls when ``fit`` ends.

The fallback is eager: if compilation fails (no C++ compiler for inductor on CPU, an unsupported op), the first
call warns once and every module of the run goes back to its eager forward; a genuine error in the module raises
again from the eager call.

``TrainConfig.compile``: "off", "on", or "auto" (the default), which compiles on CPU when the run trains at least
``AUTO_MIN_STEPS`` steps (compiling the LM block takes 21-25 s on a 2-core CPU the first time, 7-8 s once
inductor's cache holds it) and a C++ compiler is present. GPUs were not measured: "on" there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from vlkit.compiling import compiled_or_eager, compiler_present

logger = logging.getLogger(__name__)

__all__ = ["AUTO_MIN_STEPS", "Compile", "compile_for_training", "compile_targets", "resolve_compile"]

Compile = Literal["auto", "on", "off"]
# bench/compile_step.py --model llava (2-core AMD EPYC, no AMX): the llava_shapes instruct step 566 -> 444 ms in
# bf16 (1.28x; 1.16x per step of the whole recipe stage), 21-25 s to compile with a cold inductor cache, 7-8 s warm.
# Below this many steps "auto" stays eager, so that the compilation is paid back.
AUTO_MIN_STEPS = 500


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that set ``compile_in_training`` (outermost ones only)."""
    targets: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if getattr(module, "compile_in_training", False):
            targets.append(module)
            inside.update(id(child) for child in module.modules())
    return targets


def resolve_compile(
    setting: Compile, model: nn.Module, device: torch.device, steps: int, sharded: bool = False
) -> bool:
    """Whether a run compiles: "on" wherever ``model`` has targets; "auto" on CPU for runs of ``AUTO_MIN_STEPS``
    steps or more with a C++ compiler present, and not for a sharded (FSDP) model, which was not measured."""
    if setting == "off" or not compile_targets(model):
        return False
    if setting == "on":
        return True
    return device.type == "cpu" and not sharded and steps >= AUTO_MIN_STEPS and compiler_present()


def compile_for_training(model: nn.Module) -> Callable[[], None]:
    """Route the forward of ``model``'s compile targets through ``torch.compile`` while they train; returns the undo."""
    targets = compile_targets(model)
    compiled: dict[type, Callable[..., Any]] = {}
    state = {"failed": False}

    def route(module: nn.Module) -> Callable[..., Any]:
        eager = module.forward  # the bound method of the class
        kind = type(module)
        if kind not in compiled:
            compiled[kind] = torch.compile(kind.forward, dynamic=True)
        guarded = compiled_or_eager(
            functools.partial(compiled[kind], module), eager, state, "torch.compile failed",
            "training continues without it (TrainConfig.compile='off' skips the attempt)",
        )  # fmt: skip

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not (module.training and torch.is_grad_enabled()):
                return eager(*args, **kwargs)
            return guarded(*args, **kwargs)

        return forward

    for module in targets:
        module.forward = route(module)  # type: ignore[method-assign]
    if targets:
        logger.info("compiling %d %s module(s) for training", len(targets), sorted({type(m).__name__ for m in targets}))

    def undo() -> None:
        for module in targets:
            module.__dict__.pop("forward", None)

    return undo
