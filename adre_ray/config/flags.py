"""Command-line options generated from config fields (one source of truth for names, meanings, defaults).

``add_field_flags(parser, CertifyConfig, names={"num_actors": "--actors"})`` adds one ``--kebab-case``
flag per top-level field (a bool field gets ``--x / --no-x``), its help the field's ``config_field``
meaning plus its default; ``flag_values(args, CertifyConfig)`` returns the flags given, as
``load_config(..., values=...)`` takes them: text as typed, parsed by the field's type (``1e-5``,
``100_000``, ``null``, ``a,b,c`` for a tuple), never as YAML. A field added to a config gets its flag
with no other change. ``config_reference(TrainConfig)`` is the same text for every dotted key, for
``--help`` epilogs of jobs configured by ``--set key=value``. ``SuggestingParser`` names the nearest
option when one is mistyped.
"""

from __future__ import annotations

import argparse
import difflib
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from adre_ray.config.base import C, load_config
from adre_ray.config.values import Key, base_types, section_keys, section_type

FlagNames = Mapping[str, str | tuple[str, ...]]


class SuggestingParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that adds "did you mean --x?" to an unknown or ambiguous option."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match:
            typed = match.group(1).split("=", 1)[0]
            close = difflib.get_close_matches(typed, list(self._option_string_actions), n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)


def format_default(value: Any) -> str:
    """A default as a user would type it: null, true / false, comma-separated lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(format_default(v) for v in value) or "[]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if value == "":
        return "''"
    return str(value)


def field_text(key: Key) -> str:
    """``"<meaning> (default: <value>)"``."""
    return f"{key.help or key.name.replace('_', ' ')} (default: {format_default(key.default)})"


def _flags_of(name: str, names: FlagNames) -> tuple[str, ...]:
    chosen = names.get(name)
    kebab = "--" + name.replace("_", "-")
    if chosen is None:
        return (kebab,)
    chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)
    return chosen + ((kebab,) if kebab not in chosen else ())


def scalar_fields(cls: type, exclude: Iterable[str] = ()) -> list[Key]:
    """Top-level keys of ``cls`` that are not sections nor in ``exclude``."""
    skip = set(exclude)
    return [key for key in section_keys(cls) if key.name not in skip and section_type(key.type) is None]


def add_field_flags(parser: argparse.ArgumentParser, cls: type, names: FlagNames | None = None,
                    exclude: Iterable[str] = ()) -> None:
    """One flag per top-level field of ``cls`` (``names`` renames some: field -> flag or flags; the
    kebab-case name is kept as an alias). ``dest`` is the field name; unset flags stay None."""
    group = parser.add_argument_group(f"{cls.__name__} fields (override --config and --set)")
    for key in scalar_fields(cls, exclude):
        flags = _flags_of(key.name, names or {})
        text = field_text(key).replace("%", "%%")
        if base_types(key.type) == (bool,):
            group.add_argument(*flags, dest=key.name, default=None, action=argparse.BooleanOptionalAction,
                               help=text)
        else:
            group.add_argument(*flags, dest=key.name, default=None, metavar=key.name.upper(), help=text)


def flag_values(args: argparse.Namespace, cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The field flags given on the command line: field name -> value (text, or a bool)."""
    return {key.name: getattr(args, key.name) for key in scalar_fields(cls, exclude)
            if getattr(args, key.name, None) is not None}


def load_from_args(cls: type[C], args: argparse.Namespace, exclude: Iterable[str] = ()) -> C:
    """The one path of a command line into a config: ``--config`` YAML, then ``--set`` overrides, then
    the field flags (the last word wins), validated once by ``load_config``."""
    return load_config(cls, getattr(args, "config", None), list(getattr(args, "set", None) or ()),
                       values=flag_values(args, cls, exclude))


def config_reference(cls: type, prefix: str = "") -> str:
    """Every dotted key of ``cls`` with its meaning and default, one per line (for --help epilogs)."""
    lines = []
    for key in section_keys(cls):
        nested = section_type(key.type)
        if nested is not None:
            lines.append(config_reference(nested, f"{prefix}{key.name}."))
        else:
            lines.append(f"  {prefix}{key.name:<{max(1, 26 - len(prefix))}} {field_text(key)}")
    return "\n".join(lines)
