"""Optimizer parameter groups, freezing rules and learning-rate schedules.

Recipes describe freezing and per-group learning rates as regexes over parameter names (the big_vision
convention): LiT freezes ``image_encoder\\..*``, LLaVA stage 1 freezes everything but ``bridge\\..*``, EVA-CLIP
scales the learning rate per layer. ``build_param_groups`` turns such rules into the ``param_groups`` list that
``torch.optim.AdamW`` takes; ``lr_lambda`` is the warmup + cosine (or constant) factor for ``LambdaLR``
(cosine schedule: Loshchilov & Hutter, "SGDR", 2017; decoupled weight decay: "AdamW", 2019).
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

__all__ = ["ParamGroupRule", "build_param_groups", "count_parameters", "lr_lambda"]

# Decaying these pulls them towards zero, which has no regularising meaning: position embeddings and class
# tokens are learned constants, logit_scale/logit_bias are the contrastive temperature and bias.
_NO_DECAY_NAME_PARTS = ("pos_embed", "class_token", "logit_")


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
    would otherwise silently train (or freeze) the wrong tower.
    """
    compiled = [re.compile(rule.pattern) for rule in rules]
    matched = [False] * len(rules)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        rule = None
        for index, pattern in enumerate(compiled):
            if pattern.fullmatch(name):
                matched[index] = True
                rule = rules[index]
                break
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
    unmatched = [rule.pattern for rule, hit in zip(rules, matched, strict=True) if not hit]
    if unmatched:
        raise ValueError(f"parameter group rule(s) matched no parameter name: {unmatched}")
    return list(groups.values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` element counts; tied parameters are counted once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def lr_lambda(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: Literal["cosine", "constant"] = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning-rate factor for the optimizer step with zero-based index ``step``.

    Linear warmup from 0 over ``warmup_steps``, then either constant 1 or a half cosine from 1 to
    ``min_lr_ratio`` that reaches ``min_lr_ratio`` at ``step == total_steps``.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'constant'")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
