"""Typed job configs: one pydantic dataclass per job, read from YAML and overridden from the command line.

Every tunable of a job is a field here and nowhere else (a loss's parameters: in its ``LossParams``, see
``adre_ray.config.loss``). ``load_config(TrainConfig, "cfg.yaml",
["lr=0.05", "loss.lam=0.2"])`` reads the YAML with ``yaml.safe_load`` (never ``eval`` or pickle),
applies ``key=value`` overrides (values parsed as YAML scalars/lists) and per-job flag values (text),
builds the dataclass with pydantic (strict types, unknown keys refused; text given to a numeric, bool or null field is parsed
first, so ``1e-5``, ``1E-5``, ``0.00001`` and ``100_000`` all work although YAML 1.1 reads ``1e-5`` as
a string). pydantic checks the constraint declared on each field (``adre_ray.config.fields``), then the
config's ``check_together`` the rules between fields; the first refusal is raised as
``ValueError("<dotted.field>=<value!r>: <why>")``. A config built in Python
(``CertifyConfig(sigma=0.5)``, ``dataclasses.replace``) is checked field by field when it is constructed
(:func:`config_dataclass`), with the same messages. The generic checks and the vocabulary imported below
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pydantic
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

C = TypeVar("C", bound="JobConfig")
T = TypeVar("T", bound=type)

CONFIG_RULES = pydantic.ConfigDict(strict=True, extra="forbid")
"""Every config and section: JSON's types only (a number never from a bool, an integer never from a
fraction, a string never from a number), unknown keys refused."""


def config_field(default: Any, help: str) -> Any:
    """A config field with its one-line meaning: ``n: int = config_field(100_000, "estimation draws")``.

    The text is the single source of ``--help`` and the docs tables; mutable defaults are copied.
    """
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def config_dataclass(cls: T) -> T:
    """``cls`` as a pydantic dataclass under :data:`CONFIG_RULES` whose construction in Python refuses a
    value by name, ``ValueError("<field>=<value!r>: <why>")``, as loading a file does."""
    cls = pydantic.dataclasses.dataclass(cls, config=CONFIG_RULES)  # type: ignore[assignment]
    built_by_pydantic = cls.__init__

    @functools.wraps(built_by_pydantic)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            built_by_pydantic(self, *args, **kwargs)
        except pydantic.ValidationError as err:
            raise _named_error(type(self), kwargs, err.errors(include_url=False)[0]) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


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
    """The section class a field of type ``tp`` holds (a dataclass or a ``config_keys`` section), else None."""
    for base in _base_types(tp):
        if isinstance(base, type) and (dataclasses.is_dataclass(base) or hasattr(base, "config_keys")):
            return base
    return None


def field_help(cls: type, name: str) -> str:
    """The one-line meaning of field ``name`` of config ``cls`` ("" when none was given)."""
    for key in section_keys(cls):
        if key.name == name:
            return key.help
    raise KeyError(name)


def check_grid(field: str, grid: Sequence[float]) -> None:
    smoothing_params.check_grid(grid, field)


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """``dataclasses.asdict``'s dict factory: a pydantic model section (the loss) as its dict too."""
    return {key: value.model_dump() if isinstance(value, pydantic.BaseModel) else value
            for key, value in items}


class JobConfig:
    """Mixin for job dataclasses: YAML/CLI loading, dict round trip, validation hook."""

    def validate(self) -> None:
        """Check a config changed in place since it was built (constructing it checked each field) as
        ``from_dict`` checks a loaded one: every declared field constraint, then ``check_together``. A
        config checked (``load_config``, ``from_dict``, ``validate``) and unchanged since is not
        re-checked."""
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
        return dataclasses.asdict(self, dict_factory=_plain)  # type: ignore[call-overload]

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


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config={str(path)!r}: not valid YAML ({err})") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config={str(path)!r}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (),
                values: Mapping[str, Any] | None = None) -> C:
    """Build ``cls`` from an optional YAML file, then ``key=value`` overrides (YAML values), then
    ``values`` (dotted key -> value; text as typed on a command line, parsed by the field's type, never
    as YAML, so a path stays a path), then validate. Later sources win."""
    data = _read_yaml(path) if path is not None else {}
    valid = _field_paths(cls)
    for key, value in [*parse_overrides(overrides).items(), *(values or {}).items()]:
        set_dotted(data, key, value, valid_keys=valid)
    return cls.from_dict(data)


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in section_keys(cls):
        nested = section_type(key.type)
        out.extend(_field_paths(nested, f"{prefix}{key.name}.") if nested else [f"{prefix}{key.name}"])
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


def _as_number(base: type, value: Any) -> Any:
    """An ``int`` field's integral float as an int, a ``float`` field's int as a float, text parsed."""
    if isinstance(value, str):
        return parse_number(value, base)
    if base is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_value(tp: Any, value: Any) -> Any:
    """One field's value as declared: text parsed for numeric / bool / null fields, numbers as text for
    string fields, comma-separated text as a list for tuple fields. Anything else is left for pydantic
    to accept or refuse."""
    bases = _base_types(tp)
    if len(bases) != 1:
        return value
    base = bases[0]
    nested = section_type(base)
    if nested is not None:
        return _parse_text_values(nested, value) if isinstance(value, Mapping) else value
    if isinstance(value, str) and _allows_none(tp) and base is not str \
            and value.strip().lower() in ("null", "none", "~", ""):
        return None
    if base is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value
    if base in (int, float):
        return _as_number(base, value)
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
    types_of = {key.name: key.type for key in section_keys(cls)}
    return {key: (_parse_value(types_of[key], value) if key in types_of else value)
            for key, value in data.items()}


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(cls)


def _build(cls: type, data: Mapping[str, Any], parse_text: bool = True) -> Any:
    """``cls`` built from ``data`` by pydantic after the text of numeric, bool and null fields was
    parsed; every declared field constraint is checked here. Validated as JSON (strict JSON takes a
    list for a tuple and a mapping for a section, strict Python would not). Raises
    ``ValueError("<dotted.field>=<value!r>: <why>")`` naming the first refused field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config={data!r}: must be a mapping")
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


_TYPE_REQUIREMENTS = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "tuple_type": "expected a list", "list_type": "expected a list",
    "dict_type": "expected a mapping", "dataclass_type": "must be a mapping", "model_type": "must be a mapping",
    "dataclass_exact_type": "must be a mapping", "none_required": "expected null",
}


def _declared(cls: type, loc: Sequence[str]) -> Any:
    """The declared type (``Annotated`` metadata kept) of the field at ``loc``, None if there is none."""
    tp: Any = cls
    for part in loc:
        nested = section_type(tp)
        if nested is None or not dataclasses.is_dataclass(nested):
            return None
        tp = typing.get_type_hints(nested, include_extras=True).get(part)
    return tp


def _requirement(tp: Any, error: Mapping[str, Any]) -> tuple[str, Any]:
    """``(why, value)`` for a value the declared constraint ``tp`` refused: the field's ``Rule``, or a
    ``Literal``'s choices; a float field's value shown as a float."""
    value = error["input"]
    for arg in _base_types(tp):
        if typing.get_origin(arg) is typing.Literal:
            return f"must be one of {', '.join(map(str, typing.get_args(arg)))}", value
        if typing.get_origin(arg) is typing.Annotated:
            base, *metadata = typing.get_args(arg)
            value = _as_number(base, value) if base is float and not isinstance(value, str) else value
            for item in metadata:
                if type(item).__name__ == "Rule":
                    return item.why, value
    return str(error["msg"]), value


def _named_error(cls: type, data: Mapping[str, Any], error: Mapping[str, Any]) -> ValueError:
    """pydantic's first error as ``ValueError("<dotted.field>=<value!r>: <why>")``."""
    loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
    name = ".".join(loc) or "config"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        section = section_type(_declared(cls, loc[:-1])) if loc[:-1] else cls
        known = [key.name for key in section_keys(section)] if section else []
        return ValueError(f"{name}={error['input']!r}: unknown config key "
                          f"(known in this section: {', '.join(sorted(known))})")
    if error["type"] == "value_error":  # a core check: it named the field (its last part) and the value
        section = "".join(f"{part}." for part in loc[:-1])
        return ValueError(f"{section}{error['ctx']['error']}")
    if error["type"] in _TYPE_REQUIREMENTS:
        return ValueError(f"{name}={_error_value(data, error['loc'], error['input'])!r}: "
                          f"{_TYPE_REQUIREMENTS[error['type']]}")
    why, value = _requirement(_declared(cls, loc), error)
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
