"""Typed job configs: one pydantic dataclass per job, read from YAML and overridden from the command line.

Every tunable of a job is a field here and nowhere else (a loss's parameters: in its ``LossParams``, see
``adre_ray.config.loss``). ``load_config(TrainConfig, "cfg.yaml", ["lr=0.05", "loss.lam=0.2"])`` reads
the YAML with ``yaml.safe_load`` (never ``eval`` or pickle), applies ``key=value`` overrides (values
parsed as YAML scalars/lists) and per-job flag values (text), builds the dataclass with pydantic (strict
types, unknown keys refused; text given to a numeric, bool or null field is parsed first by
``adre_ray.config.values``, so ``1e-5``, ``1E-5``, ``0.00001`` and ``100_000`` all work although YAML
1.1 reads ``1e-5`` as a string). pydantic checks the constraint declared on each field
(``adre_ray.config.fields``), then the config's ``check_together`` the rules between fields; the first
refusal is raised as ``ValueError("<dotted.field>=<value!r>: <why>")`` (``adre_ray.config.errors``). A
config built in Python (``CertifyConfig(sigma=0.5)``, ``dataclasses.replace``) is checked field by field
when it is constructed (:func:`config_dataclass`), with the same messages. The generic checks and the
vocabulary imported below belong to the core (``adre_ray.checks``, ``adre_ray.smoothing.params``, ...);
they are re-exported here for the modules that still import them from the config package.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
from adre_ray.config.errors import named_error
from adre_ray.config.values import (  # noqa: F401  (Key, parse_number: re-exported)
    Key,
    parse_number,
    parse_text_values,
    section_keys,
    section_type,
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
    def init_naming_the_field(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            built_by_pydantic(self, *args, **kwargs)
        except pydantic.ValidationError as err:
            raise named_error(type(self), kwargs, err.errors(include_url=False)[0]) from None
        if isinstance(self, JobConfig):  # what validate() need not check again
            self._fields_checked_as = self.to_dict()

    cls.__init__ = init_naming_the_field  # type: ignore[method-assign]
    return cls


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
        """Check a config built in Python as ``from_dict`` checks a loaded one: every declared field
        constraint (already checked when it was constructed, unless changed in place since), then
        ``check_together``. A config checked (``load_config``, ``from_dict``, ``validate``) and unchanged
        since is not re-checked."""
        values = self.to_dict()
        if getattr(self, "_validated_as", None) == values:
            return
        if getattr(self, "_fields_checked_as", None) != values:
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


def read_yaml_mapping(path: str | Path, what: str = "config", empty_ok: bool = True) -> dict[str, Any]:
    """The mapping at the top of YAML file ``path`` (``{}`` for an empty file when ``empty_ok``), read with
    ``yaml.safe_load``; ``ValueError("<what>='<path>': <why>")`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}={str(path)!r}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{what}={str(path)!r}: not valid YAML ({err})") from err
    if loaded is None and empty_ok:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{what}={str(path)!r}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (),
                values: Mapping[str, Any] | None = None) -> C:
    """Build ``cls`` from an optional YAML file, then ``key=value`` overrides (YAML values), then
    ``values`` (dotted key -> value; text as typed on a command line, parsed by the field's type, never
    as YAML, so a path stays a path), then validate. Later sources win."""
    data = read_yaml_mapping(path) if path is not None else {}
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
    prepared = parse_text_values(cls, data) if parse_text else dict(data)
    try:
        encoded = json.dumps(prepared, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config: values must be numbers, strings, booleans, null, lists or mappings "
                         f"({err})") from None
    try:
        return _adapter(cls).validate_json(encoded, strict=True)
    except pydantic.ValidationError as err:
        raise named_error(cls, data, err.errors(include_url=False)[0]) from None


