"""Preset name -> config, in one place. ``create_model(name, **overrides)`` builds the model of a preset."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from vlkit.config import ConfigBase, check_field_value, config_from_dict

_PRESETS: dict[str, Callable[[], Any]] = {}

F = TypeVar("F", bound=Callable[[], Any])


def register_preset(function: F) -> F:
    """Register a zero-argument function returning a config under its function name."""
    name = function.__name__
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is registered twice")
    _PRESETS[name] = function
    return function


def list_models(pattern: str = "*") -> list[str]:
    import fnmatch

    _load_presets()
    return sorted(name for name in _PRESETS if fnmatch.fnmatch(name, pattern))


def get_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    _load_presets()
    if name not in _PRESETS:
        close = [n for n in _PRESETS if name.split("_")[0] in n][:8]
        raise KeyError(f"unknown model preset {name!r}" + (f"; did you mean one of {close}?" if close else ""))
    return apply_overrides(_PRESETS[name](), overrides or {})


def create_model(name: str, **overrides: Any) -> Any:
    """Build a preset with random weights. Overrides use dotted paths: ``create_model(n, **{"vision.depth": 2})``."""
    from vlkit.models.base import build_model

    return build_model(get_config(name, overrides))


def apply_overrides(config: Any, overrides: dict[str, Any], _prefix: str = "") -> Any:
    """Return a copy of a (nested) frozen config with ``{"a.b": value}`` fields replaced.

    All changes to one sub-config are applied in one ``replace`` so validation sees the final combination. A whole
    sub-config may be given as a JSON dict naming its ``kind`` (``{"bridge": {"kind": "resampler"}}``, or
    ``--set 'model.bridge={"kind": "resampler"}'``): it replaces the field with that registered config.
    """
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if not any(f.name == head for f in dataclasses.fields(config)):
            raise KeyError(f"{type(config).__name__} has no field {head!r} (in override {key!r})")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif isinstance(value, dict) and "kind" in value and isinstance(getattr(config, head), ConfigBase):
            direct[head] = config_from_dict(type(getattr(config, head)), value)
        else:
            check_field_value(config, head, value, _prefix + key)
            direct[head] = value
    for head, changes in nested.items():
        inner = direct.get(head, getattr(config, head))
        if not dataclasses.is_dataclass(inner):  # e.g. a stage's data left None: it reads the recipe's
            keys = ", ".join(f"{head}.{rest}" for rest in changes)
            raise KeyError(f"{type(config).__name__}.{head} is {inner!r}, not a config: {keys} cannot be set in it; "
                           f"give {head} whole")  # fmt: skip
        direct[head] = apply_overrides(inner, changes, f"{_prefix}{head}.")
    return dataclasses.replace(config, **direct) if direct else config


def _load_presets() -> None:
    # Presets register on import: the language models', and the image / dual-encoder families' (one module each).
    import vlkit.lm.presets
    import vlkit.models.presets  # noqa: F401
