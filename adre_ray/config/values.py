"""What the keys of a config section are, and how a value typed by a person becomes a field's value.

A section is a (pydantic) dataclass, its keys its fields, or a class that lists its keys itself
(``config_keys()``: the ``loss`` section, whose keys the declared losses give). Text reaches a field
from ``--set``, a flag or YAML 1.1 (which reads ``1e-5`` as a string); :func:`parse_text_values` turns
it into the field's type before pydantic validates strictly.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple


class Key(NamedTuple):
    """One key of a config section: its name, type (constraints left out), default and meaning."""

    name: str
    type: Any
    default: Any
    help: str


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def section_keys(cls: type) -> list[Key]:
    """The keys of a config or section: a dataclass's fields, or what a section that lists its keys
    itself (``config_keys()``, e.g. the ``loss`` section) says."""
    if hasattr(cls, "config_keys"):
        return list(cls.config_keys())
    hints = typing.get_type_hints(cls)
    return [Key(f.name, hints[f.name], _field_default(f), str(f.metadata.get("help", "")))
            for f in dataclasses.fields(cls)]


def section_type(tp: Any) -> type | None:
    """The section a field of type ``tp`` holds (a dataclass or a ``config_keys`` class), else None."""
    for base in base_types(tp):
        if isinstance(base, type) and (dataclasses.is_dataclass(base) or hasattr(base, "config_keys")):
            return base
    return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def base_types(tp: Any) -> tuple[Any, ...]:
    """``int | None`` -> ``(int,)``; ``float`` -> ``(float,)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(arg for arg in typing.get_args(tp) if arg is not type(None))
    return (tp,)


def parse_number(text: str, kind: type) -> Any:
    """A number as a person types it -> ``int`` or ``float`` (``text`` back unchanged if it is none).

    Accepts ``1e-5``, ``1E-5``, ``0.00001``, ``1.0e-5``, ``100_000``, ``100000``, ``1e5`` (an ``int``
    field takes any integral value: ``1e5`` -> 100000, ``2.5`` stays text and is refused by name).
    YAML 1.1 reads ``1e-5`` as a string, so every numeric field's string values come through here.
    """
    cleaned = text.strip()
    try:
        exact = decimal.Decimal(cleaned)
    except decimal.InvalidOperation:
        return text
    if kind is float:
        return float(exact)
    if exact.is_finite() and exact == exact.to_integral_value():
        return int(exact)
    return text


def as_number(base: type, value: Any) -> Any:
    """An ``int`` field's integral float as an int, a ``float`` field's int as a float, text parsed."""
    if isinstance(value, str):
        return parse_number(value, base)
    if base is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_value(tp: Any, value: Any) -> Any:
    """One field's value as declared: text parsed for numeric / bool / null fields, numbers as text for
    string fields, comma-separated text as a list for tuple fields. Anything else is left for pydantic
    to accept or refuse."""
    bases = base_types(tp)
    if len(bases) != 1:
        return value
    base = bases[0]
    nested = section_type(base)
    if nested is not None:
        return parse_text_values(nested, value) if isinstance(value, Mapping) else value
    if isinstance(value, str) and _allows_none(tp) and base is not str \
            and value.strip().lower() in ("null", "none", "~", ""):
        return None
    if base is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value
    if base in (int, float):
        return as_number(base, value)
    if base is str or typing.get_origin(base) is typing.Literal:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value
    if typing.get_origin(base) is tuple:
        elem = (typing.get_args(base) or (Any,))[0]
        if isinstance(value, str):
            value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [parse_value(elem, v) for v in value]
    return value


def parse_text_values(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every field value passed through ``parse_value`` (unknown keys kept for pydantic
    to refuse by name)."""
    types_of = {key.name: key.type for key in section_keys(cls)}
    return {key: (parse_value(types_of[key], value) if key in types_of else value)
            for key, value in data.items()}
