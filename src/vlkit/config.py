"""Typed configuration helpers: frozen dataclasses <-> plain JSON dicts.

Every component has one frozen dataclass (``ViTConfig``, ``TextConfig``, ...). Configs nest, and a field may hold
one of several config kinds (a vision tower is a ViT or a ConvNeXt), so each config class carries a ``kind`` tag
that is written to JSON and used to pick the class back when reading.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

_CONFIG_KINDS: dict[str, type] = {}

T = TypeVar("T")


def register_config(cls: type[T]) -> type[T]:
    """Class decorator: make a config dataclass readable from JSON by its ``kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str):
        raise TypeError(f"{cls.__name__} needs a class attribute `kind: ClassVar[str]`")
    known = _CONFIG_KINDS.get(kind)
    # The same class registering again (a module reloaded) is fine; another class taking a kind would silently make
    # saved configs of that kind load as the wrong class.
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"config kind {kind!r} is taken by {known.__module__}.{known.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} needs another kind")  # fmt: skip
    _CONFIG_KINDS[kind] = cls
    return cls


class ConfigBase:
    """Mixin with JSON conversion and ``replace``; subclasses are frozen dataclasses."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return config_from_dict(cls, data)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def config_to_dict(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": config.kind}
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        out[field.name] = _to_json(getattr(config, field.name))
    return out


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` (or the registered class named by ``data["kind"]``) from a JSON dict, checking field names."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind is not None:
        if kind not in _CONFIG_KINDS:
            raise ValueError(f"unknown config kind {kind!r}; known: {sorted(_CONFIG_KINDS)}")
        cls = _CONFIG_KINDS[kind]  # type: ignore[assignment]
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {unknown}")
    kwargs = {name: _from_json(hints[name], value) for name, value in data.items()}
    return cls(**kwargs)


def _from_json(hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if isinstance(value, dict):
            config_options = [a for a in options if dataclasses.is_dataclass(a)]
            return config_from_dict(config_options[0] if config_options else dict, value)
        for option in options:
            if (get_origin(option) is tuple or option is tuple) and isinstance(value, list):
                return _from_json(option, value)
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value)
    if origin is tuple and isinstance(value, list):
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in value)
        if args:
            return tuple(_from_json(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if origin is typing.Literal and value not in get_args(hint):
        raise ValueError(f"{value!r} is not one of {get_args(hint)}")
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        return get_type_hints(cls)
    except (NameError, TypeError):  # an annotation naming what only type checkers import: left unchecked
        return {}


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` is of the annotated type; None where the annotation is not a plain one this checks."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        answers = [_fits(value, arg) for arg in get_args(hint)]
        return True if True in answers else None if None in answers else False
    if origin is typing.Literal:
        return any(value == option and type(value) is type(option) for option in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return None


def check_field_value(config: Any, field: str, value: Any, key: str) -> None:
    """A value of the wrong type for ``config``'s ``field`` is an error naming ``key``, the override that gave it
    (``--set train.attention_products=Flase`` would otherwise arrive as a string, and a non-empty string is true)."""
    hint = _field_types(type(config)).get(field)
    if hint is not None and _fits(value, hint) is False:
        expected = getattr(hint, "__name__", None) if get_origin(hint) is None else None
        expected = expected or str(hint).replace("typing.", "")
        raise ValueError(f"override {key!r}: {type(config).__name__}.{field} takes {expected}, got {value!r}")
