"""Typed job configs: one dataclass per job, read from YAML and overridden from the command line.

Every tunable of a job is a field here and nowhere else. ``load_config(TrainConfig, "cfg.yaml",
["lr=0.05", "loss.lam=0.2"])`` reads the YAML with ``yaml.safe_load`` (never ``eval`` or pickle),
applies ``key=value`` overrides (values parsed as YAML scalars/lists), builds the dataclass and runs
its ``validate()``, which raises ``ValueError`` naming the bad field and value.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="JobConfig")

DATASETS = ("cifar10", "imagenet")
LOSSES = ("gaussian", "adre_reg", "smoothadv", "adre_adv")
TCERTIFY_MODES = ("paper", "bonferroni", "pilot")
PER_LOSSES = ("mean", "single")
SCHEDULES = ("step", "cosine")
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def config_field(default: Any, help: str) -> Any:
    """A config field with its one-line meaning: ``n: int = config_field(100_000, "estimation draws")``.

    The text is the single source of ``--help`` and the docs tables; mutable defaults are copied.
    """
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_help(cls: type, name: str) -> str:
    """The one-line meaning of field ``name`` of config dataclass ``cls`` ("" when none was given)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)


def check(condition: bool, field: str, value: Any, requirement: str) -> None:
    """Raise ``ValueError("<field>=<value!r>: <requirement>")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field}={value!r}: {requirement}")


def check_positive(field: str, value: float) -> None:
    check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, field, value,
          "must be a finite number > 0")


def check_nonnegative(field: str, value: float) -> None:
    check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, field, value,
          "must be a finite number >= 0")


def check_int_at_least(field: str, value: int, low: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= low, field, value,
          f"must be an integer >= {low}")


def check_open_unit(field: str, value: float) -> None:
    check(isinstance(value, (int, float)) and 0 < value < 1, field, value,
          "must lie in the open interval (0, 1)")


def check_choice(field: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    check(value in choices, field, value, f"must be one of {', '.join(choices)}")


def check_grid(field: str, grid: Sequence[float]) -> None:
    check(len(grid) > 0, field, grid, "must hold at least one value")
    for t in grid:
        check(isinstance(t, (int, float)) and 0 < t <= 1, field, grid, f"value {t!r} lies outside (0, 1]")


class JobConfig:
    """Mixin for job dataclasses: YAML/CLI loading, dict round trip, validation hook."""

    def validate(self) -> None:  # overridden by subclasses
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def flat_dict(self) -> dict[str, Any]:
        """``{"loss.lam": 0.1, ...}``: for MLflow params and Tune spaces."""
        return flatten(self.to_dict())

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        obj = _build(cls, data, prefix="")
        obj.validate()
        return obj

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with dotted-key changes: ``cfg.replace(**{"loss.lam": 0.2})``."""
        data = self.to_dict()
        for key, value in changes.items():
            set_dotted(data, key, value, valid_keys=self.flat_dict().keys())
        return type(self).from_dict(data)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any, valid_keys: Iterable[str] | None = None) -> None:
    parts = key.split(".")
    if valid_keys is not None and key not in set(valid_keys):
        raise ValueError(f"{key}={value!r}: unknown config key (known: {', '.join(sorted(valid_keys))})")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}={value!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "grid=[0.5, 1.0]"]`` -> ``{"a.b": 1, "grid": [0.5, 1.0]}`` (values as YAML scalars)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r}: empty key")
        try:
            parsed[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: value is not valid YAML ({err})") from err
    return parsed


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build ``cls`` from an optional YAML file plus ``key=value`` overrides, then validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config={str(path)!r}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"config={str(path)!r}: not valid YAML ({err})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config={str(path)!r}: top level must be a mapping, "
                             f"got {type(loaded).__name__}")
        data = loaded
    valid = _field_paths(cls)
    for key, value in parse_overrides(overrides).items():
        set_dotted(data, key, value, valid_keys=valid)
    return cls.from_dict(data)


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_field_paths(tp, f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}={data!r}: must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}={data[unknown[0]]!r}: unknown config key "
                         f"(known in this section: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, name = hints[f.name], data[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value or {}, name + ".")
        else:
            kwargs[f.name] = _coerce(tp, value, name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Light type coercion: int -> float, list -> tuple; anything else must already match."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ValueError:
                continue
        raise ValueError(f"{name}={value!r}: expected {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r}: expected a list")
        (elem, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(elem, v, name) for v in value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected a string")
        return str(value)
    return value
