"""pydantic's refusal of a config value as the project's message: ``<dotted.field>=<value!r>: <why>``.

``why`` is the field's declared ``Rule`` text, a ``Literal``'s choices, a core check's own text (it
names the field), or the JSON type the field expects.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from adre_ray.config.values import base_types, section_keys, section_type

_TYPE_REQUIREMENTS = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list",
    "tuple_type": "expected a list (in Python: a tuple)",
    "dict_type": "expected a mapping", "dataclass_type": "must be a mapping",
    "dataclass_exact_type": "must be a mapping (in Python: the section's class)",
    "model_type": "must be a mapping (in Python: the section's class)",
    "none_required": "expected null",
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
    for arg in base_types(tp):
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


def named_error(cls: type, data: Mapping[str, Any], error: Mapping[str, Any]) -> ValueError:
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
