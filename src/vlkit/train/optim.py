"""Optimizer parameter groups, freezing rules, layer-wise learning-rate decay, LAMB and learning-rate schedules.

Recipes describe freezing and per-group learning rates as regexes over parameter names (the big_vision
convention): LiT freezes ``image_encoder\\..*``, LLaVA stage 1 freezes everything but ``bridge\\..*``, EVA-CLIP
scales the learning rate per layer (``layer_decay_rules``: BEiT, Bao et al., 2022; EVA-CLIP, Sun et al., 2023).
``build_param_groups`` turns such rules into the ``param_groups`` list that ``build_optimizer`` gives to AdamW
(Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) or to ``Lamb`` (You et al., "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", 2020), EVA-CLIP's optimizer. ``lr_lambda`` is the
warmup + cosine (or constant, or warmup-stable-decay) factor for ``LambdaLR`` (cosine schedule: Loshchilov & Hutter,
"SGDR", 2017; warmup-stable-decay: Hu et al., "MiniCPM", 2024).
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

__all__ = [
    "Lamb",
    "ParamGroupRule",
    "build_optimizer",
    "build_param_groups",
    "count_parameters",
    "dual_encoder_layer_decay_rules",
    "layer_decay_rules",
    "lr_lambda",
]

# Decaying these pulls them towards zero, which has no regularising meaning: position embeddings and class
# tokens are learned constants, logit_scale/logit_bias are the contrastive temperature and bias, and the
# D-Abstractor's reference points are coordinates in [0, 1] (decay would pull each towards the image's top-left
# corner) with its queries' position embeddings beside them.
_NO_DECAY_NAME_PARTS = ("pos_embed", "class_token", "logit_", "reference_points", "query_pos")


@dataclass(frozen=True)
class ParamGroupRule:
    """One regex rule over full parameter names; the first rule whose ``pattern`` fully matches a name wins.

    ``lr_scale`` multiplies the base learning rate, ``weight_decay`` (when set) replaces the base weight decay
    for the parameters that are decayed at all, and ``freeze`` sets ``requires_grad=False`` and keeps the
    parameter out of the optimizer.
    """

    pattern: str
    lr_scale: float = 1.0
    weight_decay: float | None = None
    freeze: bool = False

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ValueError(f"ParamGroupRule pattern {self.pattern!r} is not a valid regex: {error}") from error
        if self.lr_scale < 0:
            raise ValueError(f"ParamGroupRule {self.pattern!r}: lr_scale must be >= 0, got {self.lr_scale}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"ParamGroupRule {self.pattern!r}: weight_decay must be >= 0, got {self.weight_decay}")


def _is_decayed(name: str, parameter: nn.Parameter) -> bool:
    # Biases, norm gains and scalars are 0-D/1-D; decaying them hurts and buys nothing (GPT-2/CLIP practice).
    return parameter.ndim >= 2 and not any(part in name for part in _NO_DECAY_NAME_PARTS)


def build_param_groups(
    model: nn.Module, rules: Sequence[ParamGroupRule], lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Apply ``rules`` to ``model`` and return AdamW parameter groups.

    A rule with ``freeze=True`` sets ``requires_grad_(False)`` on what it matches; any other rule sets
    ``requires_grad_(True)``, so a later stage can unfreeze what an earlier stage froze by naming it. Parameters
    no rule matches keep their current ``requires_grad``. Each group carries ``lr`` (already scaled),
    ``weight_decay``, ``lr_scale`` and ``param_names``; groups are ordered by first appearance and empty ones
    are dropped. A rule that matches no parameter raises ``ValueError``, because a typo in a freezing regex
    would otherwise silently train (or freeze) the wrong tower. So does a rule whose every match an earlier
    non-freeze rule takes (it can never act); one shadowed only by freeze rules is fine, which is how a lock
    composes with per-layer rules: ``(ParamGroupRule(r"image_encoder\\..*", freeze=True), *layer_decay_rules(...))``.
    """
    compiled = [re.compile(rule.pattern) for rule in rules]
    matched = [False] * len(rules)
    seen = [False] * len(rules)
    shadowed_by_freeze_only = [True] * len(rules)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        rule = None
        for index, pattern in enumerate(compiled):
            if not pattern.fullmatch(name):
                continue
            if rule is None:
                matched[index] = True
                rule = rules[index]
            else:
                seen[index] = True
                shadowed_by_freeze_only[index] &= rule.freeze
        if rule is not None:
            parameter.requires_grad_(not rule.freeze)
        if not parameter.requires_grad:
            continue
        lr_scale = rule.lr_scale if rule is not None else 1.0
        decay = weight_decay if rule is None or rule.weight_decay is None else rule.weight_decay
        decay = decay if _is_decayed(name, parameter) else 0.0
        group = groups.setdefault(
            (lr_scale, decay),
            {"params": [], "param_names": [], "lr": lr * lr_scale, "weight_decay": decay, "lr_scale": lr_scale},
        )
        group["params"].append(parameter)
        group["param_names"].append(name)
    unmatched = [rule.pattern for index, rule in enumerate(rules) if not (matched[index] or seen[index])]
    if unmatched:
        raise ValueError(f"parameter group rule(s) matched no parameter name: {unmatched}")
    shadowed = [
        rule.pattern for index, rule in enumerate(rules) if not matched[index] and not shadowed_by_freeze_only[index]
    ]
    if shadowed:
        raise ValueError(f"parameter group rule(s) shadowed by earlier rules (the first match wins): {shadowed}")
    return list(groups.values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` element counts; tied parameters are counted once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


Schedule = Literal["cosine", "constant", "wsd"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
WSD_DECAY_FRACTION = 0.2  # the share of the steps the wsd schedule decays over (MiniCPM: ~10 %; 20 % is common)


def lr_lambda(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: Schedule = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning-rate factor for the optimizer step with zero-based index ``step``.

    Linear warmup from 0 over ``warmup_steps``, then constant 1, or a half cosine from 1 to ``min_lr_ratio`` that
    reaches it at ``step == total_steps``, or warmup-stable-decay (``wsd``; Hu et al., 2024, "MiniCPM"): 1 until the
    last ``WSD_DECAY_FRACTION`` of the steps, then linearly down to ``min_lr_ratio`` at ``step == total_steps``.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(WSD_DECAY_FRACTION * total_steps))
        left = min(1.0, max(0.0, (total_steps - step) / decay_steps))  # 1 until the decay starts, 0 at the end
        return min_lr_ratio + (1.0 - min_lr_ratio) * left
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- layer-wise lr decay

# Parameters that act before a tower's first block (ViT: patch embedding, class token, position embedding and the
# CLIP-style norm in front of the blocks; text tower: token and position embeddings) sit at "layer 0" of BEiT's
# numbering. EVA-CLIP's name lists leave the pre-block norm (``ln_pre``) at scale 1; it runs before block 0, so it is
# decayed with the embeddings here.
_EMBEDDING_NAMES = ("patch_embed", r"pos_embed\w*", "class_token", "token_embed", "norm_pre")


def layer_decay_rules(
    depth: int, decay: float, prefix: str = "image_encoder", weight_decay: float | None = None
) -> tuple[ParamGroupRule, ...]:
    """Layer-wise learning-rate decay (BEiT; EVA-CLIP) for the transformer tower whose parameters start ``prefix.``.

    With layers numbered 0 (embeddings), 1..depth (``blocks.{i}`` is layer i + 1) and depth + 1 (final norm, pooling
    head, and everything outside the tower), layer l trains at ``decay ** (depth + 1 - l)`` times the base rate:
    block i at ``decay ** (depth - i)``, the embeddings at ``decay ** (depth + 1)``. Only the embedding and block
    parameters get a rule, so the rest keeps scale 1 (or what a later rule says). The first matching rule wins in
    ``build_param_groups``: put freeze rules before these and other rules for the same tower after them. Apply it to
    a text tower with ``prefix="text_encoder"`` and the text depth; ``weight_decay`` is passed to every rule.
    """
    if depth < 1:
        raise ValueError(f"layer_decay_rules: depth must be >= 1, got {depth}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer_decay_rules: decay must be in (0, 1], got {decay}")
    tower = re.escape(prefix)
    embeddings = ParamGroupRule(
        rf"{tower}\.({'|'.join(_EMBEDDING_NAMES)})(\..*)?", lr_scale=decay ** (depth + 1), weight_decay=weight_decay
    )
    blocks = tuple(
        ParamGroupRule(rf"{tower}\.blocks\.{index}\..*", lr_scale=decay ** (depth - index), weight_decay=weight_decay)
        for index in range(depth)
    )
    return (embeddings, *blocks)


def dual_encoder_layer_decay_rules(
    config: Any, image_decay: float | None, text_decay: float | None = None
) -> tuple[ParamGroupRule, ...]:
    """``layer_decay_rules`` for a ``DualEncoderConfig``'s ViT image tower and/or its text tower (``None``: off).

    EVA-CLIP decays both towers, each with its own factor.
    """
    rules: tuple[ParamGroupRule, ...] = ()
    for prefix, tower, decay in (
        ("image_encoder", config.vision, image_decay),
        ("text_encoder", config.text, text_decay),
    ):
        if decay is None:
            continue
        depth = getattr(tower, "depth", None)
        if not isinstance(depth, int):
            raise ValueError(
                f"layer-wise lr decay needs a transformer {prefix} with blocks.{{i}}, got {type(tower).__name__}"
            )
        rules += layer_decay_rules(depth, decay, prefix)
    return rules


# ---------------------------------------------------------------------------------------------- optimizers


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam's bias-corrected direction, rescaled per parameter tensor by the trust ratio ||w|| / ||update||.

    For each tensor w with gradient g at step t (You et al., 2020, Algorithm 2, with phi the identity)::

        m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
        r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
        u = r + weight_decay * w               (decoupled: the decay is in the update, not in the gradient)
        w = w - lr * trust * u,                trust = ||w|| / ||u||, or 1 where either norm is 0

    As in EVA-CLIP's (timm's, NVIDIA's) LAMB, a group with ``weight_decay == 0`` (biases, norms, embeddings from
    ``build_param_groups``) takes the plain Adam step with trust 1 unless ``always_adapt``; ``trust_clip`` caps the
    trust ratio at 1 (LAMBC, Fong et al., 2020). Gradient clipping is left to the trainer (``grad_clip``): clipping
    by global norm before the step is what those implementations' ``max_grad_norm`` does. Every step is a handful
    of ``torch._foreach_*`` calls per (device, dtype) bucket, not a Python loop over elements.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        trust_clip: bool = False,
        always_adapt: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"Lamb: lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Lamb: betas must be two values in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"Lamb: eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if parameter.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                buckets.setdefault((parameter.device, parameter.dtype), []).append(parameter)
            for parameters in buckets.values():
                self._step_bucket(group, parameters)
        return loss

    def _step_bucket(self, group: dict[str, Any], parameters: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [parameter.grad for parameter in parameters]
        states = [self.state[parameter] for parameter in parameters]
        for parameter, state in zip(parameters, states, strict=True):
            if not state:
                # A float32 tensor step (as torch's Adam keeps it) round-trips through safetensors checkpoints.
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1.0)

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        # One Python float per tensor (not per element): steps can differ within a group when parameters join late.
        counts = [step.item() for step in steps]
        if group["bias_correction"]:
            first = [1.0 - beta1**count for count in counts]
            second_root = [math.sqrt(1.0 - beta2**count) for count in counts]
        else:
            first = second_root = [1.0] * len(counts)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, second_root)
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(exp_avgs, first)
        torch._foreach_div_(updates, denominators)  # r: the bias-corrected Adam direction

        weight_decay = group["weight_decay"]
        if weight_decay != 0:
            torch._foreach_add_(updates, parameters, alpha=weight_decay)
        if weight_decay != 0 or group["always_adapt"]:
            # Norms of bf16 weights in at least fp32: a trust ratio off by 1% shifts every step of the tensor.
            norm_dtype = torch.promote_types(parameters[0].dtype, torch.float32)
            weight_norms = torch.stack(torch._foreach_norm(parameters, 2, dtype=norm_dtype))
            update_norms = torch.stack(torch._foreach_norm(updates, 2, dtype=norm_dtype))
            # A zero weight (fresh zero init) or a zero update has no scale to compare with: fall back to Adam.
            usable = (weight_norms > 0) & (update_norms > 0)
            trust = torch.where(usable, weight_norms / update_norms.where(usable, 1.0), 1.0)
            if group["trust_clip"]:
                trust = trust.clamp(max=1.0)
            torch._foreach_mul_(updates, list(trust.to(updates[0].dtype).unbind()))
        torch._foreach_add_(parameters, updates, alpha=-group["lr"])


def build_optimizer(
    groups: list[dict[str, Any]],
    name: Literal["adamw", "lamb"],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    device: torch.device | str,
) -> torch.optim.Optimizer:
    """The optimizer over ``build_param_groups``'s groups: AdamW (fused on CPU/CUDA when the build has it) or LAMB.

    The group dicts are copied, since ``add_param_group`` fills defaults into the dicts it gets.
    """
    device = torch.device(device)
    options = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
    if name == "lamb":
        return Lamb([dict(group) for group in groups], **options)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'lamb'")
    if device.type in ("cpu", "cuda"):
        try:
            # A failed fused attempt must not leave defaults filled into the dicts the fallback gets.
            return torch.optim.AdamW([dict(group) for group in groups], fused=True, **options)
        except RuntimeError:
            pass
    return torch.optim.AdamW([dict(group) for group in groups], foreach=device.type != "cpu", **options)
