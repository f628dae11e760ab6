"""Binomial confidence bounds used by CERTIFY and T-CERTIFY (pure numpy/scipy, no torch, no Ray).

``pA_lower``: one-sided Clopper-Pearson lower bound on a class probability from its count,
    P(pA_lower(N_A, n, alpha) > p_A) <= alpha  for N_A ~ Bin(n, p_A).
``pB_upper``: the generalized upper bound of the seed paper's eq. 14 on the largest probability among
    the "other" classes, from their counts N_j (one multinomial sample of size n):
    pB_upper = inf { p in [0, 1] : S(p) <= beta },  S(p) = sum_j P(Bin(n, p) <= N_j).
    For the true p_B = max_j p_j (attained at class j*): p_B > pB_upper implies S(p_B) <= beta, hence
    P(Bin(n, p_B) <= N_j*) <= beta, an event of probability <= beta. So P(pB_upper < p_B) <= beta.
    With one other class it is the plain Clopper-Pearson upper bound at level beta.
``pB_upper_max``: the one-sided Clopper-Pearson upper bound of the largest other count M = max_j N_j,
    cp_upper(M, n, beta). Valid: N_j* <= M and cp_upper grows with the count, so
    P(cp_upper(M) < p_B) <= P(cp_upper(N_j*) < p_B) <= beta. Never looser than eq. 14: S(p) >=
    P(Bin(n, p) <= M), so every p with S(p) <= beta also has P(Bin(n, p) <= M) <= beta.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special

ROOT_XTOL = 1e-15
"""Absolute tolerance of the root finder in ``pB_upper`` (the result is then rounded up to be safe)."""


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}: must be an integer >= 1")
    return int(n)


def _check_level(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not (
        0 < value < 1
    ):
        raise ValueError(f"{name}={value!r}: must lie in the open interval (0, 1)")
    return float(value)


def _check_count(name: str, value: int, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: must be an integer")
    if value < 0 or value > n:
        raise ValueError(f"{name}={value!r}: must lie in [0, n={n}]")
    return int(value)


def as_count_array(name: str, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """``counts`` as a 1-D int64 array; ValueError naming ``name`` if not integral, negative or not 1-D."""
    arr = np.asarray(counts)
    if arr.ndim != 1:
        raise ValueError(f"{name}={_short(counts)}: must be a 1-D vector of counts, got shape {arr.shape}")
    if arr.size and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}={_short(counts)}: counts must be integers")
    elif arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name}={_short(counts)}: counts must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name}={_short(counts)}: counts must be >= 0 (found {int(arr.min())})")
    return arr


def _short(values: object, limit: int = 80) -> str:
    text = repr(np.asarray(values).tolist()) if not isinstance(values, str) else repr(values)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pA_lower(nA: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound: Beta quantile B(alpha; nA, n - nA + 1), 0 if nA = 0.

    Equal to ``scipy.stats.beta.ppf(alpha, nA, n - nA + 1)`` (``special.betaincinv`` is the same routine
    without the distribution-object overhead).
    """
    n = _check_n(n)
    nA = _check_count("nA", nA, n)
    alpha = _check_level("alpha", alpha)
    if nA == 0:
        return 0.0
    return float(special.betaincinv(nA, n - nA + 1, alpha))


def cp_upper(N: int, n: int, beta: float) -> float:
    """One-sided (1 - beta) Clopper-Pearson upper bound B(1 - beta; N + 1, n - N); 1 if N = n."""
    if n <= N:
        return 1.0
    return float(special.betaincinv(N + 1, n - N, 1.0 - beta))


PB_BOUNDS = ("sum", "max")
"""T-CERTIFY runner-up bounds: sum = eq. 14 (``pB_upper``), max = CP bound of the largest other count."""


def _check_runner_up_args(other_counts: Sequence[int] | np.ndarray, n: int,
                          beta: float) -> tuple[int, np.ndarray, float]:
    """(n, counts array, float beta) of a runner-up bound's arguments; ``ValueError`` naming a bad one."""
    n = _check_n(n)
    counts = as_count_array("other_counts", other_counts)
    if counts.size and counts.max() > n:
        raise ValueError(f"other_counts={_short(other_counts)}: counts must be <= n={n} "
                         f"(found {int(counts.max())})")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or math.isnan(beta):
        raise ValueError(f"beta={beta!r}: must be a number")
    return n, counts, float(beta)


def pB_upper_max(other_counts: Sequence[int] | np.ndarray, n: int, beta: float) -> float:
    """cp_upper(max_j N_j, n, beta): inf { p : P(Bin(n, p) <= max_j N_j) <= beta }.

    Guarantee: P(pB_upper_max < max_j p_j) <= beta (see the module docstring), and it is <= ``pB_upper``
    on the same counts and level. Edge cases as ``pB_upper``: no other classes -> 0; ``beta <= 0`` -> 1;
    ``beta >= 1`` -> 0.
    """
    n, counts, beta = _check_runner_up_args(other_counts, n, beta)
    if counts.size == 0:
        return 0.0
    if beta <= 0:
        return 1.0
    if beta >= 1:
        return 0.0
    return cp_upper(int(counts.max()), n, beta)


def runner_up_upper(other_counts: Sequence[int] | np.ndarray, n: int, beta: float, bound: str) -> float:
    """The runner-up bound named ``bound`` (``PB_BOUNDS``): ``pB_upper`` (sum) or ``pB_upper_max`` (max)."""
    if bound == "sum":
        return pB_upper(other_counts, n, beta)
    if bound == "max":
        return pB_upper_max(other_counts, n, beta)
    raise ValueError(f"pb_bound={bound!r}: must be one of {', '.join(PB_BOUNDS)}")


def pB_upper(other_counts: Sequence[int] | np.ndarray, n: int, beta: float) -> float:
    """inf { p in [0, 1] : sum_j P(Bin(n, p) <= N_j) <= beta } over the counts N_j of the other classes.

    Guarantee: P(pB_upper < max_j p_j) <= beta when the counts are one multinomial sample of size n.
    Edge cases, exactly: no other classes -> 0; ``beta <= 0`` -> 1 (no error budget); ``beta`` >= the
    number of classes m -> 0 (the sum never exceeds m); classes with N_j = n add 1 to the sum for every p,
    so beta below their number -> 1 and otherwise they are removed with their share of beta;
    all N_j = 0 -> 1 - (beta / m)^(1/n) in closed form. Otherwise the sum S(p) is continuous and strictly
    decreasing, and its root S(p) = beta is bracketed between the per-class bounds
    cp_upper(max N_j, beta) (S >= the largest class's term) and cp_upper(max N_j, beta / m) (each term
    <= beta / m), then solved by Brent's method to ~1e-15 and rounded up so that S(result) <= beta.
    Equal counts are grouped, so 1,000 classes cost a handful of vectorized CDF calls per iteration.
    """
    n, counts, beta = _check_runner_up_args(other_counts, n, beta)
    m = int(counts.size)
    if m == 0:
        return 0.0
    if beta <= 0:
        return 1.0
    if beta >= m:
        return 0.0
    values, mult = np.unique(counts, return_counts=True)
    if values[-1] == n:  # P(Bin(n, p) <= n) = 1 for every p: these classes use up their share of beta.
        full = int(mult[-1])
        if beta < full:
            return 1.0
        values, mult, m, beta = values[:-1], mult[:-1], m - full, beta - full
        if m == 0:
            return 0.0
        if beta <= 0:
            return 1.0
    if values[-1] == 0:
        return float(-math.expm1(math.log(beta / m) / n))
    return _solve_sum_root(values.astype(np.float64), mult.astype(np.float64), n, beta, m)


def _solve_sum_root(values: np.ndarray, mult: np.ndarray, n: int, beta: float, m: int) -> float:
    """Root of S(p) = sum_k mult_k * P(Bin(n, p) <= values_k) = beta, with S(0) = m > beta > S(1) = 0."""

    def excess(p: float) -> float:
        return float(np.dot(mult, special.bdtr(values, n, p))) - beta

    n_max = int(values[-1])
    lo = cp_upper(n_max, n, beta) if beta < 1 else 0.0
    hi = cp_upper(n_max, n, beta / m)
    if lo > 0 and excess(lo) < 0:  # float round-off at the bracket end; S(0) = m > beta always holds
        lo = 0.0
    if hi < 1 and excess(hi) > 0:
        hi = 1.0
    if excess(hi) == 0:
        return hi
    root = float(optimize.brentq(excess, lo, hi, xtol=ROOT_XTOL, rtol=4 * np.finfo(float).eps, maxiter=200))
    # Brent returns a point within the tolerance of the root on either side; step up until S <= beta so
    # the reported value is never below the true infimum by more than the float resolution.
    step = ROOT_XTOL
    while root < 1 and excess(root) > 0:
        root = min(1.0, root + step)
        step *= 2
    return root
