"""The smoothing parameters' vocabulary and ranges: ONE check each for sigma, alpha, n and the grid.

Pure Python (no torch, numpy or config): the configs declare their fields with these checks, and the
library calls (``certify_counts``, ``sample_counts``, ...) run the same ones, so a value is accepted or
refused by one rule wherever it enters. The rule is the strictest the project ever applied:

- sigma: a finite number in (0, ``MAX_SIGMA``]; bools refused;
- alpha: a number in the open interval (0, 1); bools refused;
- n (draws): an integer in [low, 2**63 - 1]; bools refused;
- grid: a non-empty sequence of t in (0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from adre_ray.checks import check, check_int_at_least, check_open_unit, is_number

TCERTIFY_MODES = ("paper", "bonferroni", "pilot")
"""T-CERTIFY's choice of the alpha split t (adre_ray.smoothing.certify)."""
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""T-CERTIFY's default grid of t = a' / alpha."""

MAX_SIGMA = 100.0
"""Largest noise std accepted. Images live in [0, 1], so at sigma = 100 the noise is 100 times the whole
pixel range: the smoothed classifier's vote is that of pure noise (the literature's sigmas are 0.12 to
1.0). Anything above is a typo, and values near float32's limit (sigma * N(0, 1) noise of ~3e38) would
overflow to inf inside an actor, after Ray started."""

SIGMA_RULE = f"must be a finite number in (0, {MAX_SIGMA:g}]"


def check_sigma(value: Any, field: str = "sigma") -> float:
    """``value`` as a float if it is a usable noise std (finite, 0 < sigma <= ``MAX_SIGMA``), else
    ``ValueError("<field>=<value>: must be a finite number in (0, 100]")``."""
    check(is_number(value) and math.isfinite(value) and 0 < value <= MAX_SIGMA, field, value, SIGMA_RULE)
    return float(value)


def check_alpha(value: Any, field: str = "alpha") -> float:
    """``value`` as a float if it is a failure probability in the open interval (0, 1)."""
    check_open_unit(field, value)
    return float(value)


def check_draws(value: Any, field: str = "n", low: int = 1) -> int:
    """``value`` if it is a number of Monte Carlo draws: an integer in [``low``, 2**63 - 1]."""
    check_int_at_least(field, value, low)
    return int(value)


def check_grid(value: Sequence[float], field: str = "grid") -> tuple[float, ...]:
    """``value`` as a tuple if it is a non-empty grid of t in (0, 1]."""
    try:
        grid = tuple(value)
    except TypeError:
        raise ValueError(f"{field}={value!r}: must be a sequence of numbers in (0, 1]") from None
    check(len(grid) > 0, field, value, "must hold at least one value")
    for t in grid:
        check(is_number(t) and 0 < t <= 1, field, value, f"value {t!r} lies outside (0, 1]")
    return tuple(float(t) for t in grid)
