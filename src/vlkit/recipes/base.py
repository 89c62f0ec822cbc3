"""The ``Recipe`` dataclass and the recipe registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from vlkit.data.shapes import ShapesConfig
from vlkit.registry import apply_overrides
from vlkit.train import ParamGroupRule, TrainConfig
from vlkit.train.optim import dual_encoder_layer_decay_rules

_RECIPES: dict[str, Callable[[], Recipe]] = {}

LOCK_PATTERNS = {"image": r"image_encoder\..*", "text": r"text_encoder\..*"}
INPUT_POLICIES = ("square", "pack", "resize_square", "pad_square")


@dataclass(frozen=True)
class Recipe:
    """What to train, on what, and how.

    ``data``: "shapes" renders ``train_size`` ShapesWorld scenes (``shapes`` config) to a manifest under the run
    folder, plus a colourless copy (``shapes.colourless_copy``) of the first ``colourless_copies`` x ``train_size``
    of them (a classification recipe instead shows that fraction of its scenes colourless); "digits" uses
    scikit-learn's scanned digits. ``lock`` freezes a tower (LiT's locked-image tuning is
    ``lock="image"``); ``model_overrides`` are dotted config paths applied to the preset.

    ``image_init`` starts the image tower from another model (LiT, EVA-CLIP): a model directory, or
    ``"recipe:NAME"``, which trains recipe NAME into ``OUT/pretrain`` first (once; its vision architecture follows
    this recipe's ``vision.*`` overrides, ``image_init_overrides`` adjust the rest, e.g. its steps).
    ``image_layer_decay`` / ``text_layer_decay`` turn on layer-wise lr decay for that tower (BEiT, EVA-CLIP).
    ``input_policy`` picks how images become tokens: "square" (the preset's square size), or NaViT's
    comparison at equal token slots per batch (``vlkit.recipes.navit``): "pack" (native aspect ratio, packed;
    ``pack_oversample`` x more samples than square images per batch, into the same token slots, each sequence as long as
    ``pack_sequence_slots`` square images), "resize_square" or "pad_square".
    """

    name: str
    description: str
    model: str
    train: TrainConfig
    data: Literal["shapes", "digits"] = "shapes"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    train_size: int = 10_000
    colourless_copies: float = 0.0
    eval_size: int = 400
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab_size: int = 512
    lock: Literal["none", "image", "text"] = "none"
    image_init: str | None = None
    image_init_overrides: dict[str, Any] = field(default_factory=dict)
    image_layer_decay: float | None = None
    text_layer_decay: float | None = None
    input_policy: Literal["square", "pack", "resize_square", "pad_square"] = "square"
    pack_oversample: float = 1.0
    pack_sequence_slots: int = 1

    def __post_init__(self) -> None:
        if self.train_size < self.train.batch_size:
            raise ValueError(f"recipe {self.name}: train_size {self.train_size} < batch_size {self.train.batch_size}")
        if self.input_policy not in INPUT_POLICIES:
            raise ValueError(f"recipe {self.name}: input_policy must be one of {INPUT_POLICIES}, got "
                             f"{self.input_policy!r}")  # fmt: skip
        if not 0.0 <= self.colourless_copies <= 1.0:
            raise ValueError(f"recipe {self.name}: colourless_copies must be in [0, 1], got {self.colourless_copies}")
        if self.pack_oversample < 1.0:
            raise ValueError(f"recipe {self.name}: pack_oversample must be >= 1, got {self.pack_oversample}")
        if self.pack_sequence_slots < 1 or self.train.batch_size % self.pack_sequence_slots:
            raise ValueError(f"recipe {self.name}: pack_sequence_slots {self.pack_sequence_slots} must be >= 1 and "
                             f"divide the batch size {self.train.batch_size}")  # fmt: skip
        for name in ("image_layer_decay", "text_layer_decay"):
            decay = getattr(self, name)
            if decay is not None and not 0.0 < decay <= 1.0:
                raise ValueError(f"recipe {self.name}: {name} must be in (0, 1] or None, got {decay}")

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

    def param_group_rules(self, model_config: Any | None = None) -> tuple[ParamGroupRule, ...]:
        """The lock, then the layer-wise lr decay of ``model_config``'s towers, then ``train.param_groups``.

        That order is the one ``build_param_groups`` needs (the first matching rule wins): a locked tower stays
        frozen whatever its decay rules say, and the decay rules take a tower's blocks before any broader rule.
        """
        rules: tuple[ParamGroupRule, ...] = ()
        if self.lock != "none":
            rules += (ParamGroupRule(LOCK_PATTERNS[self.lock], freeze=True),)
        if self.image_layer_decay is not None or self.text_layer_decay is not None:
            if model_config is None:
                raise ValueError(f"recipe {self.name}: layer-wise lr decay needs the model config (its depths)")
            rules += dual_encoder_layer_decay_rules(model_config, self.image_layer_decay, self.text_layer_decay)
        return (*rules, *self.train.param_groups)


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
    import vlkit.recipes.family
    import vlkit.recipes.navit  # noqa: F401
