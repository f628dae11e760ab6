"""Typed job configs: one dataclass per job, read from YAML and overridden from the command line.

Every tunable of a job is a field here and nowhere else. ``load_config(TrainConfig, "cfg.yaml",
["lr=0.05", "loss.lam=0.2"])`` reads the YAML with ``yaml.safe_load`` (never ``eval`` or pickle),
applies ``key=value`` overrides (values parsed as YAML scalars/lists) and per-job flag values (text),
builds the dataclass with pydantic (strict types; text given to a numeric, bool or null field is parsed
first, so ``1e-5``, ``1E-5``, ``0.00001`` and ``100_000`` all work although YAML 1.1 reads ``1e-5`` as
a string). pydantic checks the constraint declared on each field (``adre_ray.config.fields``), then the
config's ``check_together`` the rules between fields; the first refusal is raised as
``ValueError("<dotted.field>=<value!r>: <why>")``. The generic checks and the vocabulary imported below
belong to the core (``adre_ray.checks``, ``adre_ray.smoothing.params``, ...); they are re-exported here
for the modules that still import them from the config package.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import functools
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from adre_ray.checks import (  # noqa: F401  (the core's checks, re-exported for the configs)
    MAX_INT,
    check,
    check_choice,
    check_finite,
    check_int_at_least,
    check_nonnegative,
    check_open_unit,
    check_positive,
)
from adre_ray.data.info import DATASETS  # noqa: F401
from adre_ray.models.formats import IMPORT_FORMATS  # noqa: F401
from adre_ray.precision import PRECISIONS, check_precision, effective_precision  # noqa: F401
from adre_ray.smoothing import params as smoothing_params
from adre_ray.smoothing.params import DEFAULT_GRID, MAX_SIGMA, TCERTIFY_MODES  # noqa: F401
from adre_ray.training.names import BUILT_IN_LOSSES as LOSSES  # noqa: F401
from adre_ray.training.names import PER_LOSSES, SCHEDULES  # noqa: F401

if typing.TYPE_CHECKING:
    import pydantic

C = TypeVar("C", bound="JobConfig")



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


def check_grid(field: str, grid: Sequence[float]) -> None:
    smoothing_params.check_grid(grid, field)


class JobConfig:
    """Mixin for job dataclasses: YAML/CLI loading, dict round trip, validation hook."""

    def validate(self) -> None:
        """Check a config built in Python (``CertifyConfig(sigma=0.5)``, ``dataclasses.replace``) as
        ``from_dict`` checks a loaded one: every declared field constraint, then ``check_together``. A
        config checked at the edge (``load_config``, ``from_dict``) and unchanged since is not re-checked."""
        values = self.to_dict()
        if getattr(self, "_validated_as", None) == values:
            return
        _build(type(self), values, parse_text=False)
        self.check_together()
        self._validated_as = values

    def check_together(self) -> None:  # overridden by configs whose fields constrain each other
        """Rules that involve several fields; ``ValueError("<field>=<value>: <why>")``."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def flat_dict(self) -> dict[str, Any]:
        """``{"loss.lam": 0.1, ...}``: for MLflow params and Tune spaces."""
        return flatten(self.to_dict())

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        obj = _build(cls, data)
        obj.check_together()
        obj._validated_as = obj.to_dict()
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


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (),
                values: Mapping[str, Any] | None = None) -> C:
    """Build ``cls`` from an optional YAML file, then ``key=value`` overrides (YAML values), then
    ``values`` (dotted key -> value; text as typed on a command line, parsed by the field's type, never
    as YAML, so a path stays a path), then validate. Later sources win."""
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
    for key, value in [*parse_overrides(overrides).items(), *(values or {}).items()]:
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


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _base_types(tp: Any) -> tuple[Any, ...]:
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


def _integral_float(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _parse_value(tp: Any, value: Any) -> Any:
    """One field's value as declared: text parsed for numeric / bool / null fields, numbers as text for
    string fields, comma-separated text as a list for tuple fields. Anything else is left for pydantic
    to accept or refuse."""
    bases = _base_types(tp)
    if len(bases) != 1:
        return value
    base = bases[0]
    if dataclasses.is_dataclass(base):
        return _parse_text_values(base, value) if isinstance(value, Mapping) else value
    if isinstance(value, str) and _allows_none(tp) and base is not str \
            and value.strip().lower() in ("null", "none", "~", ""):
        return None
    if base is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value
    if base in (int, float):
        if isinstance(value, str):
            return parse_number(value, base)
        return _integral_float(value) if base is int else value
    if base is str or typing.get_origin(base) is typing.Literal:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value
    if typing.get_origin(base) is tuple:
        elem = (typing.get_args(base) or (Any,))[0]
        if isinstance(value, str):
            value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [_parse_value(elem, v) for v in value]
    return value


def _parse_text_values(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every field value passed through ``_parse_value`` (unknown keys kept for pydantic
    to refuse by name)."""
    hints = typing.get_type_hints(cls)
    return {key: (_parse_value(hints[key], value) if key in hints else value) for key, value in data.items()}


_PYDANTIC_CONFIG = {"extra": "forbid"}
"""pydantic's ``ConfigDict(extra="forbid")`` (a plain dict). pydantic is imported only when a config is
built, so the core (smoothing, training, models) imports without it, as on a GPU machine that has torch
and no pydantic (benchmarks/device_check.sh)."""


def _prepare_for_pydantic(cls: type) -> None:
    """Give ``cls`` and its section dataclasses pydantic's config: unknown keys are refused."""
    if "__pydantic_config__" not in vars(cls):
        cls.__pydantic_config__ = _PYDANTIC_CONFIG  # type: ignore[attr-defined]
    for tp in typing.get_type_hints(cls).values():
        for base in _base_types(tp):
            if dataclasses.is_dataclass(base) and isinstance(base, type):
                _prepare_for_pydantic(base)


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter[Any]:
    import pydantic

    _prepare_for_pydantic(cls)
    return pydantic.TypeAdapter(cls)


_TYPE_REQUIREMENTS = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "tuple_type": "expected a list", "list_type": "expected a list",
    "dict_type": "expected a mapping", "dataclass_type": "must be a mapping",
    "none_required": "expected null",
}


def _section_fields(cls: type, path: Sequence[Any]) -> list[str]:
    """Field names of the section that ``path`` (a pydantic error location, minus the key) points into."""
    for part in path:
        hints = typing.get_type_hints(cls)
        nested = [b for b in _base_types(hints.get(str(part), Any)) if dataclasses.is_dataclass(b)]
        if not nested:
            return []
        cls = nested[0]
    return [f.name for f in dataclasses.fields(cls)]


def _declared(cls: type, loc: Sequence[str]) -> Any:
    """The declared type (``Annotated`` metadata kept) of the field at ``loc``, None if there is none."""
    tp: Any = cls
    for part in loc:
        nested = [b for b in _base_types(tp) if dataclasses.is_dataclass(b)]
        if not nested:
            return None
        tp = typing.get_type_hints(nested[0], include_extras=True).get(part)
    return tp


def _requirement(cls: type, loc: Sequence[str], error: Mapping[str, Any]) -> tuple[str, Any]:
    """``(why, value)`` for a value the declared constraint of field ``loc`` refused: the field's
    ``Rule``, or a ``Literal``'s choices; a float field's value shown as a float."""
    tp = _declared(cls, loc)
    value = error["input"]
    for arg in _base_types(tp):
        if typing.get_origin(arg) is typing.Literal:
            return f"must be one of {', '.join(map(str, typing.get_args(arg)))}", value
        if typing.get_origin(arg) is typing.Annotated:
            base, *metadata = typing.get_args(arg)
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            for item in metadata:
                if type(item).__name__ == "Rule":
                    return item.why, value
    return str(error["msg"]), value


def _build(cls: type, data: Mapping[str, Any], parse_text: bool = True) -> Any:
    """``cls`` built from ``data`` by pydantic in strict mode (JSON semantics: a number is never taken
    from a bool, an integer never from a fraction, a string never from a number) after the text of
    numeric, bool and null fields was parsed; every declared field constraint is checked here.
    Raises ``ValueError("<dotted.field>=<value!r>: <why>")`` naming the first refused field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config={data!r}: must be a mapping")
    import pydantic

    prepared = _parse_text_values(cls, data) if parse_text else dict(data)
    try:
        encoded = json.dumps(prepared, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config: values must be numbers, strings, booleans, null, lists or mappings "
                         f"({err})") from None
    try:
        return _adapter(cls).validate_json(encoded, strict=True)
    except pydantic.ValidationError as err:
        raise _named_error(cls, data, err.errors(include_url=False)[0]) from None


def _named_error(cls: type, data: Mapping[str, Any], error: Mapping[str, Any]) -> ValueError:
    """pydantic's first error as ``ValueError("<dotted.field>=<value!r>: <why>")``."""
    loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
    name = ".".join(loc) or "config"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _section_fields(cls, loc[:-1])
        return ValueError(f"{name}={error['input']!r}: unknown config key "
                          f"(known in this section: {', '.join(sorted(known))})")
    if error["type"] == "value_error":  # a core check: it named the field (its last part) and the value
        section = "".join(f"{part}." for part in loc[:-1])
        return ValueError(f"{section}{error['ctx']['error']}")
    if error["type"] in _TYPE_REQUIREMENTS:
        return ValueError(f"{name}={_error_value(data, error['loc'], error['input'])!r}: "
                          f"{_TYPE_REQUIREMENTS[error['type']]}")
    why, value = _requirement(cls, loc, error)
    return ValueError(f"{name}={value!r}: {why}")


def _error_value(data: Any, loc: Sequence[Any], fallback: Any) -> Any:
    """The value the user gave for the field at ``loc`` (pydantic reports the JSON-decoded one, of one
    list element): the whole field value, as the message names the field, not the element."""
    node = data
    for part in loc:
        if isinstance(part, int):
            break
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return fallback
    return node
