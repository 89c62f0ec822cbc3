"""The ``Recipe`` dataclass and the recipe registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from vlkit.data.shapes import ShapesConfig
from vlkit.registry import apply_overrides
from vlkit.train import ParamGroupRule, TrainConfig

_RECIPES: dict[str, Callable[[], Recipe]] = {}

LOCK_PATTERNS = {"image": r"image_encoder\..*", "text": r"text_encoder\..*"}


@dataclass(frozen=True)
class Recipe:
    """What to train, on what, and how.

    ``data``: "shapes" renders ``train_size`` ShapesWorld scenes (``shapes`` config) to a manifest under the run
    folder; "digits" uses scikit-learn's scanned digits. ``lock`` freezes a tower (LiT's locked-image tuning is
    ``lock="image"``); ``model_overrides`` are dotted config paths applied to the preset.
    """

    name: str
    description: str
    model: str
    train: TrainConfig
    data: Literal["shapes", "digits"] = "shapes"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    train_size: int = 10_000
    eval_size: int = 400
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab_size: int = 512
    lock: Literal["none", "image", "text"] = "none"

    def __post_init__(self) -> None:
        if self.train_size < self.train.batch_size:
            raise ValueError(f"recipe {self.name}: train_size {self.train_size} < batch_size {self.train.batch_size}")

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """Apply ``{"train.lr": 1e-3, "model.vision.depth": 2, "shapes.max_objects": 2, ...}``.

        A new ``train.steps`` keeps the schedule's shape: warmup is scaled by the same factor unless it is given.
        """
        if "train.steps" in overrides and "train.warmup_steps" not in overrides:
            scaled = round(self.train.warmup_steps * int(overrides["train.steps"]) / self.train.steps)
            overrides = {**overrides, "train.warmup_steps": scaled}
        model_changes = {k.removeprefix("model."): v for k, v in overrides.items() if k.startswith("model.")}
        rest = {k: v for k, v in overrides.items() if not k.startswith("model.")}
        recipe = apply_overrides(self, rest) if rest else self
        if model_changes:
            recipe = dataclasses.replace(recipe, model_overrides={**recipe.model_overrides, **model_changes})
        return recipe

    def param_group_rules(self) -> tuple[ParamGroupRule, ...]:
        rules = self.train.param_groups
        if self.lock != "none":
            rules = (ParamGroupRule(LOCK_PATTERNS[self.lock], freeze=True), *rules)
        return rules


def register_recipe(function: Callable[[], Recipe]) -> Callable[[], Recipe]:
    _RECIPES[function.__name__] = function
    return function


def list_recipes() -> list[str]:
    _load()
    return sorted(_RECIPES)


def get_recipe(name: str) -> Recipe:
    _load()
    if name not in _RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]()


def _load() -> None:
    import vlkit.recipes.classification
    import vlkit.recipes.contrastive
    import vlkit.recipes.navit  # noqa: F401
