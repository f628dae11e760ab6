"""Field types of the job configs: the constraint is declared on the field, pydantic enforces it.

A field is ``Annotated[<type>, <pydantic constraint or validator>, Rule(<why>)]``: ``Field(ge=..., le=...)``
bounds, ``Literal[...]`` choices, or an ``AfterValidator`` calling the core's one check of the quantity
(``adre_ray.smoothing.params.check_sigma`` for every sigma, ...). ``Rule`` is the text a refused value is
named with (``"<dotted.field>=<value>: <why>"``, composed by ``adre_ray.config.errors``); a core check
writes its own text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo

from adre_ray.checks import MAX_INT
from adre_ray.smoothing import params


@dataclass(frozen=True)
class Rule:
    """What a value of the field must be: the ``<why>`` of ``"<field>=<value>: <why>"``."""

    why: str


def core_check(check: Callable[[Any, str], Any]) -> AfterValidator:
    """A field validator running the core's check ``check(value, field_name)`` (it names the field)."""

    def validate(value: Any, info: ValidationInfo) -> Any:
        check(value, str(info.field_name))
        return value

    return AfterValidator(validate)


def int_at_least(low: int) -> Any:
    """An integer in [low, 2**63 - 1] (torch and numpy count and seed with int64)."""
    return Annotated[int, Field(ge=low, le=MAX_INT), Rule(f"must be an integer >= {low} (at most 2**63 - 1)")]


def non_empty(what: str) -> Any:
    """Text with at least one non-blank character."""
    return Annotated[str, Field(pattern=r"\S"), Rule(f"must be a non-empty {what}")]


def named(why: str) -> Any:
    """Text that is not empty (a path, a name)."""
    return Annotated[str, Field(min_length=1), Rule(why)]


def finite(why: str, **bounds: float) -> Any:
    """A finite number within ``bounds`` (pydantic's gt / ge / lt / le)."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds), Rule(why)]


Sigma = Annotated[float, core_check(params.check_sigma)]
Alpha = Annotated[float, core_check(params.check_alpha)]
Draws = Annotated[int, core_check(params.check_draws)]
Grid = Annotated[tuple[float, ...], core_check(params.check_grid)]
Count = int_at_least(1)
NonNegativeInt = int_at_least(0)
Seed = NonNegativeInt
PositiveNumber = finite("must be a finite number > 0", gt=0)
NonNegativeNumber = finite("must be a finite number >= 0", ge=0)
Seconds = finite("must be a finite number of seconds >= 0", ge=0)
Probability = Annotated[float, Field(ge=0, lt=1), Rule("must be a number in [0, 1)")]
