"""``field=value: why`` checks shared by the core and the configs (pure Python, no imports).

Every refusal names the field and the value given: ``ValueError("<field>=<value!r>: <requirement>")``.
A quantity's own rule (the range of sigma, alpha, n) lives with the core package that owns it
(``adre_ray.smoothing.params``); this module only holds the generic forms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MAX_INT = 2**63 - 1
"""Largest integer a field takes (torch and numpy count and seed with int64)."""


def check(condition: bool, field: str, value: Any, requirement: str) -> None:
    """Raise ``ValueError("<field>=<value!r>: <requirement>")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field}={value!r}: {requirement}")


def is_number(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` to Python, never a count or a level)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(field: str, value: float) -> None:
    check(is_number(value) and math.isfinite(value), field, value, "must be a finite number")


def check_positive(field: str, value: float) -> None:
    check(is_number(value) and math.isfinite(value) and value > 0, field, value,
          "must be a finite number > 0")


def check_nonnegative(field: str, value: float) -> None:
    check(is_number(value) and math.isfinite(value) and value >= 0, field, value,
          "must be a finite number >= 0")


def check_int_at_least(field: str, value: int, low: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT, field, value,
          f"must be an integer >= {low} (at most 2**63 - 1)")


def check_open_unit(field: str, value: float) -> None:
    check(is_number(value) and 0 < value < 1, field, value, "must lie in the open interval (0, 1)")


def check_choice(field: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    check(value in choices, field, value, f"must be one of {', '.join(choices)}")
