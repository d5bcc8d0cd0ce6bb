"""Checking plain values (from Python, JSON or YAML) against dataclass field annotations.

Recipe files arrive as untyped mappings; a value of the wrong type (``"32"`` for a batch size,
``1`` for a flag) must be rejected with the option's name before any training starts rather than
fail, or silently misbehave, hours later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from .errors import TrainConfigError


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``hint``; returns it normalised (ints become floats for floats)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(hint) and type(value) in (str, int), value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, normalised = _matches(value, option)
            if ok:
                return True, normalised
        return False, value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        (item_hint,) = typing.get_args(hint)
        out = []
        for item in value:
            ok, normalised = _matches(item, item_hint)
            if not ok:
                return False, value
            out.append(normalised)
        return True, out
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    raise TypeError(f"unsupported annotation {hint!r}")  # a programming error, not user input


def check_fields(instance: Any, prefix: str) -> None:
    """Type-check every field of a (frozen) dataclass instance in place, normalising numbers.

    Raises:
        TrainConfigError: naming the first field whose value does not fit its annotation.
    """
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        ok, normalised = _matches(value, hints[f.name])
        if not ok:
            raise TrainConfigError(
                f"{prefix}.{f.name} must be {_describe(hints[f.name])}; got {value!r}"
            )
        if normalised is not value:
            object.__setattr__(instance, f.name, normalised)


def reject_unknown(values: Mapping[str, Any], cls: type, prefix: str) -> None:
    """Raise :class:`TrainConfigError` naming keys of ``values`` that ``cls`` has no field for."""
    if not isinstance(values, Mapping):
        raise TrainConfigError(f"{prefix} must be a mapping of options; got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainConfigError(
            f"unknown {prefix} option(s) {', '.join(map(str, unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
