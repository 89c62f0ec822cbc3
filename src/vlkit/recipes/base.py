"""``Recipe`` = name, description, model (preset + overrides), data, task and stages; and the recipe registry.

A one-stage recipe::

    Recipe("clip_shapes", "CLIP on ShapesWorld.", model="shapes_clip", task=Contrastive(), data=SHAPES,
           stages=(Stage(SHAPES_BUDGET),))

A staged one gives each stage its own train config, parameter rules (regex freeze / lr scale, ``LayerDecay``),
data, task and where each part's weights start (``init``: part name -> ``InitFrom``); parts a stage does not name
continue from the previous stage (the first stage: from the task's freshly built model).

Overrides (``with_overrides``, ``vlkit train --set``) address every level: ``model.vision.depth``, ``data.train_size``,
``data.config.max_objects``, ``task.inputs``; ``train.lr`` sets every stage's, ``stages.NAME.train.lr`` (or
``stages.1.train.lr``) one stage's; ``lock`` (``--lock``) replaces every stage's tower locks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from vlkit.config import ConfigBase, config_from_dict, register_config
from vlkit.data.specs import DataSpec
from vlkit.registry import apply_overrides
from vlkit.tasks.base import Task, task_from_dict
from vlkit.train import ParamGroupRule, TrainConfig
from vlkit.train.optim import layer_decay_rules

__all__ = [
    "LOCK_PATTERNS",
    "InitFrom",
    "LayerDecay",
    "Recipe",
    "Stage",
    "describe_changes",
    "get_recipe",
    "list_recipes",
    "lock_rules",
    "recipe_from_dict",
    "register_recipe",
]

_RECIPES: dict[str, Callable[[], Recipe]] = {}

# The towers ``--lock`` names, as the parameter-name patterns of each model kind's towers.
LOCK_PATTERNS = {"image": r"(image_encoder|encoder)\..*", "text": r"(text_encoder|lm)\..*"}


def lock_rules(lock: Literal["none", "image", "text"]) -> tuple[ParamGroupRule, ...]:
    if lock not in ("none", *LOCK_PATTERNS):
        raise ValueError(f"lock must be one of none, {', '.join(LOCK_PATTERNS)}; got {lock!r}")
    return () if lock == "none" else (ParamGroupRule(LOCK_PATTERNS[lock], freeze=True),)


@register_config
@dataclass(frozen=True)
class LayerDecay(ConfigBase):
    """Layer-wise lr decay (BEiT, EVA-CLIP) for the transformer tower at ``part`` (its ``blocks`` set the depth)."""

    kind: ClassVar[str] = "layer_decay"
    part: str
    decay: float

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"LayerDecay({self.part!r}): decay must be in (0, 1], got {self.decay}")

    def rules(self, model: nn.Module) -> tuple[ParamGroupRule, ...]:
        blocks = getattr(model.get_submodule(self.part), "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"LayerDecay: {self.part} is not a transformer tower with blocks.{{i}}")
        return layer_decay_rules(len(blocks), self.decay, self.part)


Rule = ParamGroupRule | LayerDecay


@register_config
@dataclass(frozen=True)
class InitFrom(ConfigBase):
    """Where a part's weights start: ``source`` is a model directory (vlkit or Hugging Face) or ``"recipe:NAME"``
    (that recipe is trained into ``OUT/pretrain/NAME`` first, once); ``part`` is the module to take from the source
    (default: the target part's name, or the source's image tower for an image tower). ``share`` lists config
    prefixes (e.g. ``"vision"``) whose ``model.*`` overrides a ``recipe:`` source inherits, so its tower has this
    recipe's architecture; ``overrides`` adjust the source recipe further (e.g. its steps)."""

    kind: ClassVar[str] = "init_from"
    source: str
    part: str | None = None
    share: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One training stage; ``data`` / ``task`` default to the recipe's (``None``). ``evaluate=False`` skips the
    task's evaluation at the stage's end (an intermediate stage whose numbers mean little, e.g. a text-only one)."""

    train: TrainConfig
    name: str = "train"
    rules: tuple[Rule, ...] = ()
    data: DataSpec | None = None
    task: Task | None = None
    init: Mapping[str, InitFrom] = field(default_factory=dict)
    evaluate: bool = True

    def __post_init__(self) -> None:
        # JSON (recipe.json, ``--set stages.NAME.init={...}``) -> typed values.
        init = {part: InitFrom.from_dict(spec) if isinstance(spec, dict) else spec for part, spec in self.init.items()}
        object.__setattr__(self, "init", init)
        object.__setattr__(self, "rules", tuple(_rule(rule) if isinstance(rule, dict) else rule for rule in self.rules))
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", config_from_dict(object, self.data))
        if isinstance(self.task, dict):
            object.__setattr__(self, "task", task_from_dict(self.task))

    def param_group_rules(self, model: nn.Module) -> tuple[ParamGroupRule, ...]:
        """The stage's rules with ``LayerDecay`` expanded for ``model``, then ``train.param_groups`` (first match
        wins in ``build_param_groups``: a freeze rule listed first keeps a tower frozen whatever follows)."""
        expanded: tuple[ParamGroupRule, ...] = ()
        for rule in self.rules:
            expanded += rule.rules(model) if isinstance(rule, LayerDecay) else (rule,)
        return (*expanded, *self.train.param_groups)


@dataclass(frozen=True)
class Recipe:
    """What to train, on what, and how; see the module docstring."""

    name: str
    description: str
    model: str
    task: Task
    data: DataSpec
    stages: tuple[Stage, ...]
    model_overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"recipe {self.name}: needs at least one stage")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name}: stage names must differ, got {names}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> Recipe:
        """Apply dotted overrides (see the module docstring). A new ``train.steps`` keeps each schedule's shape:
        warmup is scaled by the same factor unless it is given."""
        recipe, every_stage, per_stage = self, {}, {stage.name: {} for stage in self.stages}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            if head == "model":
                recipe = dataclasses.replace(recipe, model_overrides={**recipe.model_overrides, rest: value})
            elif head in ("train", "lock"):
                every_stage[key] = value
            elif head == "stages":
                index, _, stage_key = rest.partition(".")
                per_stage[self.stage(index).name][stage_key] = value
            else:
                changes[key] = value
        # A stage's own setting wins over one for every stage, in whatever order they were given.
        per_stage = {name: {**every_stage, **own} for name, own in per_stage.items()}
        recipe = apply_overrides(recipe, changes) if changes else recipe
        stages = tuple(_override_stage(stage, per_stage[stage.name]) for stage in recipe.stages)
        return dataclasses.replace(recipe, stages=stages)

    def stage(self, key: str | int) -> Stage:
        """A stage by name or index."""
        for index, stage in enumerate(self.stages):
            if str(key) in (stage.name, str(index)):
                return stage
        raise KeyError(f"recipe {self.name} has no stage {key!r}; stages: {[stage.name for stage in self.stages]}")

    def to_dict(self) -> dict[str, Any]:
        """What a run folder's ``recipe.json`` holds: every field as it was trained."""
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "model_overrides": _json(dict(self.model_overrides)),
            "task": self.task.to_dict(),
            "data": self.data.to_dict(),
            "stages": [_stage_dict(stage) for stage in self.stages],
        }


def describe_changes(before: Recipe, after: Recipe, given: Iterable[str] = ()) -> list[str]:
    """What overrides changed, one ``key: old -> new`` line per changed setting (stages by name), so that a user sees
    what ``--set`` resolved to, e.g. the warmup that a new ``train.steps`` scaled (``given``: the override keys, so
    that a warmup set by hand is not called scaled)."""
    old, new = _flatten(before.to_dict()), _flatten(after.to_dict())
    warmup_given = any(key.endswith("train.warmup_steps") for key in given)
    lines = []
    for key in dict.fromkeys([*old, *new]):
        was, now = old.get(key, "(unset)"), new.get(key, "(unset)")
        if was == now:
            continue
        # Model overrides are addressed as model.KEY, as --set gives them.
        line = f"{key.replace('model_overrides.', 'model.', 1)}: {was} -> {now}"
        if key.endswith(".train.warmup_steps") and not warmup_given:
            line += " (scaled with train.steps; give train.warmup_steps to choose it)"
        lines.append(line)
    return lines


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list) and value and all(isinstance(item, dict) and "name" in item for item in value):
        items = ((item["name"], item) for item in value)  # stages, by name
    else:
        return {prefix: json.dumps(value) if isinstance(value, list | dict) else value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _override_stage(stage: Stage, changes: dict[str, Any]) -> Stage:
    if not changes:
        return stage
    changes = dict(changes)
    lock = changes.pop("lock", None)
    if "train.steps" in changes and "train.warmup_steps" not in changes:
        scaled = round(stage.train.warmup_steps * int(changes["train.steps"]) / stage.train.steps)
        changes["train.warmup_steps"] = min(scaled, int(changes["train.steps"]))
    stage = apply_overrides(stage, changes) if changes else stage
    if lock is not None:
        unlocked = tuple(rule for rule in stage.rules if not _is_lock(rule))
        stage = dataclasses.replace(stage, rules=(*lock_rules(lock), *unlocked))
    return stage


def _is_lock(rule: Rule) -> bool:
    return isinstance(rule, ParamGroupRule) and rule.freeze and rule.pattern in LOCK_PATTERNS.values()


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _stage_dict(stage: Stage) -> dict[str, Any]:
    rules = [rule.to_dict() if isinstance(rule, LayerDecay) else dataclasses.asdict(rule) for rule in stage.rules]
    return {
        "name": stage.name,
        "train": _json(stage.train.to_dict()),
        "rules": _json(rules),
        "data": None if stage.data is None else stage.data.to_dict(),
        "task": None if stage.task is None else stage.task.to_dict(),
        "init": {part: _json(init.to_dict()) for part, init in stage.init.items()},
        "evaluate": stage.evaluate,
    }


def _rule(item: dict[str, Any]) -> Rule:
    return LayerDecay.from_dict(item) if item.get("kind") == "layer_decay" else ParamGroupRule(**item)


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """The inverse of ``Recipe.to_dict`` (a run folder's ``recipe.json``)."""
    stages = tuple(
        Stage(**{**item, "train": TrainConfig.from_dict(item["train"])})  # Stage converts the rest from JSON
        for item in data["stages"]
    )
    return Recipe(
        name=data["name"],
        description=data["description"],
        model=data["model"],
        task=task_from_dict(data["task"]),
        data=config_from_dict(object, data["data"]),
        stages=stages,
        model_overrides=data.get("model_overrides", {}),
    )


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
    import vlkit.recipes.blip2
    import vlkit.recipes.contrastive
    import vlkit.recipes.family
    import vlkit.recipes.vlm  # noqa: F401
