"""The training package's value rules, each declared once as an annotated type (pydantic).

A rule is ``Annotated[T, rule(requirement, holds)]``: loss parameters declare their fields with these
types (``adre_ray.training.losses.base``), and plain functions apply one with :func:`checked`. Either
way a bad value raises ``ValueError("<field>=<value!r>: <requirement>")``, the project's message form,
and no type coercion happens before the rule has seen the value (``k=1.5`` is refused, not truncated).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import pydantic
from pydantic import BeforeValidator

from adre_ray.checks import MAX_INT, check
from adre_ray.smoothing.params import MAX_SIGMA, SIGMA_RULE, check_sigma

require = check
"""``ValueError("<field>=<value!r>: <requirement>")`` unless ``condition`` (a rule between values)."""


def rule(requirement: str, holds: Callable[[Any], bool]) -> BeforeValidator:
    """A pydantic validator that lets a value through unchanged if ``holds(value)``, else raises
    ``ValueError(requirement)`` (made ``<field>=<value!r>: <requirement>`` by :func:`error_message`)."""

    def validate(value: Any) -> Any:
        if not holds(value):
            raise ValueError(requirement)
        return value

    return BeforeValidator(validate)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT


@functools.cache
def int_at_least(low: int) -> Any:
    """An integer in [low, 2**63 - 1]."""
    return Annotated[int, rule(f"must be an integer >= {low} (at most 2**63 - 1)",
                               lambda value: _int_in(value, low))]


AtLeastOne = int_at_least(1)
AtLeastZero = int_at_least(0)


def one_of(choices: Sequence[str]) -> Any:
    """One of ``choices`` (the names in the message in their order)."""
    allowed = tuple(choices)
    return Annotated[str, rule(f"must be one of {', '.join(allowed)}", lambda value: value in allowed)]


PositiveFloat = Annotated[float, rule("must be a finite number > 0", lambda v: _real(v) and v > 0)]
NonNegativeFloat = Annotated[float, rule("must be a finite number >= 0", lambda v: _real(v) and v >= 0)]
def _is_sigma(value: Any) -> bool:
    try:
        check_sigma(value)
    except ValueError:
        return False
    return True


Sigma = Annotated[float, rule(SIGMA_RULE, _is_sigma)]
"""A noise std: the one rule of sigma (``adre_ray.smoothing.params.check_sigma``: finite, 0 < sigma <=
``MAX_SIGMA``)."""
UnitFraction = Annotated[float, rule("must be a finite number in [0, 1)", lambda v: _real(v) and 0 <= v < 1)]
"""A fraction in [0, 1) (label smoothing, momentum)."""
DecayFactor = Annotated[float, rule("must lie in (0, 1]", lambda v: _real(v) and 0 < v <= 1)]
Momentum = Annotated[float, rule("must lie in [0, 1)", lambda v: _real(v) and 0 <= v < 1)]


def error_message(error: pydantic.ValidationError, prefix: str = "") -> str:
    """``<prefix><field>=<value!r>: <requirement>`` for the first error pydantic found."""
    first = error.errors()[0]
    field = prefix + ".".join(str(part) for part in first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    requirement = str(cause) if cause is not None else first["msg"]
    if first["type"] == "missing":
        return f"{field}: required"
    if first["type"] == "extra_forbidden":
        return f"{field}={first['input']!r}: unknown parameter"
    return f"{field}={first['input']!r}: {requirement}"


@functools.cache
def _adapter(kind: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(kind)


def checked(field: str, value: Any, kind: Any) -> Any:
    """``value`` if it satisfies rule type ``kind``, else ``ValueError("<field>=<value!r>: <requirement>")``
    (an integral float given for a float field comes back as a float)."""
    try:
        return _adapter(kind).validate_python(value)
    except pydantic.ValidationError as error:
        raise ValueError(error_message(error, prefix=field)) from None


__all__ = [
    "MAX_INT", "MAX_SIGMA", "AtLeastOne", "AtLeastZero", "DecayFactor", "Momentum", "NonNegativeFloat",
    "PositiveFloat", "Sigma", "UnitFraction", "checked", "error_message", "int_at_least", "one_of", "require",
    "rule",
]
