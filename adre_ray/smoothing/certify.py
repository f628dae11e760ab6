"""PREDICT, CERTIFY (Cohen et al. 2019) and T-CERTIFY (seed paper, Algorithm 2) on class counts.

Everything here is a function of count vectors only, so the Ray driver (which sums the counts of many
shards) and a notebook user (who samples them with one model) get bit-identical results.

Notation: ``pilot_counts`` are the n0 selection draws, ``counts`` the n estimation draws, independent of
the pilot; cA = argmax pilot; N_A = counts[cA]; N_j the other classes' counts; Phi the standard normal CDF.

- CERTIFY: pA_lower = CP lower bound at alpha; radius sigma * Phi^-1(pA_lower), abstain if pA_lower < 1/2.
  With probability >= 1 - alpha (over the n draws) it abstains or g is constant = cA on the l2 ball.
- T-CERTIFY at one split a' = t * alpha: pA_lower at a', pB_upper (eq. 14) at alpha - a', clipped to
  1 - pA_lower, radius sigma / 2 (Phi^-1(pA_lower) - Phi^-1(pB_upper)). By the union bound both bounds
  hold with probability >= 1 - alpha, and then the radius is a valid certificate for cA.
  Modes for choosing t (``TCERTIFY_MODES``):
  ``paper``       max over the grid at alpha. The failure events are nested (pA_lower grows with a',
                  pB_upper shrinks with the budget alpha - a'), so their union has probability
                  <= a'_max + (alpha - a'_min) = alpha (t_max + 1 - t_min): 1.9 alpha for the default grid.
                  Reproduces the paper; NOT proven at level alpha.
  ``bonferroni``  the same grid max at level alpha / (t_max + 1 - t_min): by the bound above the union of
                  the failure events has probability <= alpha. Provably valid. One grid point t: level alpha.
  ``pilot``       t is chosen from the pilot counts alone (plug-in counts n * pilot / n0, the t with the
                  largest plug-in margin Phi^-1(pA_lower) - Phi^-1(pB_upper) at level alpha), then
                  evaluated once on ``counts`` at level alpha. t is independent of ``counts``, so the
                  single-split guarantee applies conditionally on t. Provably valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from adre_ray.checks import check_choice
from adre_ray.smoothing.bounds import PB_BOUNDS, _short, as_count_array, pA_lower, runner_up_upper
from adre_ray.smoothing.params import DEFAULT_GRID, TCERTIFY_MODES, check_alpha, check_grid, check_sigma

ABSTAIN = -1

__all__ = [
    "ABSTAIN", "DEFAULT_GRID", "PB_BOUNDS", "TCERTIFY_MODES", "SmoothingResult", "certify_counts",
    "effective_pb_bound", "predict_counts", "tcertify_counts",
]


@dataclass(frozen=True)
class SmoothingResult:
    """Outcome of PREDICT / CERTIFY / T-CERTIFY for one image.

    predict      certified (or predicted) class, ``ABSTAIN`` (-1) when the procedure abstains
    radius       certified l2 radius in input units (0.0 on abstain and for PREDICT)
    pA_lower     lower confidence bound on p_A (nan for PREDICT)
    pB_upper     upper bound on p_B actually used in the radius (nan for PREDICT); CERTIFY reports
                 1 - pA_lower, T-CERTIFY min(eq. 14 bound, 1 - pA_lower)
    alpha_prime  the level spent on pA_lower (alpha for CERTIFY; t * level for T-CERTIFY)
    mode         "predict", "certify", "paper", "bonferroni" or "pilot"
    candidate    the class tested (cA = argmax pilot for CERTIFY/T-CERTIFY, top count for PREDICT),
                 reported even when the procedure abstains
    n_A          count of ``candidate`` among the n estimation draws
    n            number of estimation draws
    t            grid value chosen (1.0 for CERTIFY, nan for PREDICT)
    alpha        overall failure probability requested by the caller
    p_value      two-sided binomial p-value of PREDICT (nan otherwise)
    pb_bound     runner-up bound used by T-CERTIFY: "sum" (eq. 14) or "max" ("" for PREDICT / CERTIFY)
    """

    predict: int
    radius: float
    pA_lower: float
    pB_upper: float
    alpha_prime: float
    mode: str
    candidate: int
    n_A: int
    n: int
    t: float
    alpha: float
    p_value: float = math.nan
    pb_bound: str = ""

    @property
    def abstained(self) -> bool:
        return self.predict == ABSTAIN


# ----------------------------------------------------------------------------------------------- checks


def _check_mode(mode: str) -> str:
    check_choice("mode", mode, TCERTIFY_MODES)
    return mode


def _check_counts(name: str, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = as_count_array(name, counts)
    if arr.size == 0:
        raise ValueError(f"{name}={_short(counts)}: must hold at least one class")
    return arr


def _check_pair(pilot_counts: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, int]:
    pilot = _check_counts("pilot_counts", pilot_counts)
    main = _check_counts("counts", counts)
    if pilot.size != main.size:
        raise ValueError(f"pilot_counts={_short(pilot_counts)}: length {pilot.size} differs from "
                         f"counts length {main.size}")
    n = int(main.sum())
    if n < 1:
        raise ValueError(f"counts={_short(counts)}: sum is 0, need at least one estimation draw")
    return pilot, main, n


# --------------------------------------------------------------------------------------------- PREDICT


def predict_counts(counts: Sequence[int] | np.ndarray, alpha: float) -> SmoothingResult:
    """Cohen's PREDICT: the top class if a two-sided binomial test of the top two counts rejects at alpha.

    Guarantee: the returned class differs from g(x) (and is not an abstention) with probability <= alpha.
    Ties go to the lowest class index (and then the test cannot reject).
    """
    arr = _check_counts("counts", counts)
    alpha = check_alpha(alpha)
    top = int(np.argmax(arr))
    nA = int(arr[top])
    nB = int(np.delete(arr, top).max()) if arr.size > 1 else 0
    p_value = float(stats.binomtest(nA, nA + nB, 0.5).pvalue) if nA + nB > 0 else 1.0
    return SmoothingResult(
        predict=top if p_value <= alpha else ABSTAIN, radius=0.0, pA_lower=math.nan, pB_upper=math.nan,
        alpha_prime=alpha, mode="predict", candidate=top, n_A=nA, n=int(arr.sum()), t=math.nan,
        alpha=alpha, p_value=p_value,
    )


# --------------------------------------------------------------------------------------------- CERTIFY


def certify_counts(pilot_counts: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray,
                   sigma: float, alpha: float) -> SmoothingResult:
    """Cohen's CERTIFY: cA = argmax pilot (lowest index on ties), pA_lower = CP(alpha) on counts[cA].

    Abstain if pA_lower < 1/2, else radius = sigma * Phi^-1(pA_lower). With probability >= 1 - alpha
    over the estimation draws, a non-abstaining answer is g(x) and g is constant on the l2 ball.
    """
    pilot, main, n = _check_pair(pilot_counts, counts)
    sigma, alpha = check_sigma(sigma), check_alpha(alpha)
    cA = int(np.argmax(pilot))
    nA = int(main[cA])
    pa = pA_lower(nA, n, alpha)
    certified = pa >= 0.5
    return SmoothingResult(
        predict=cA if certified else ABSTAIN, radius=sigma * float(special.ndtri(pa)) if certified else 0.0,
        pA_lower=pa, pB_upper=1.0 - pa, alpha_prime=alpha, mode="certify", candidate=cA, n_A=nA, n=n,
        t=1.0, alpha=alpha,
    )


# ------------------------------------------------------------------------------------------- T-CERTIFY


def split_radius(sigma: float, pa: float, pb: float) -> float:
    """sigma / 2 (Phi^-1(pa) - Phi^-1(pb)) for pa > 1/2, else 0; pb is clipped to 1 - pa first.

    When the clip is active the value is computed as sigma * Phi^-1(pa), the very expression CERTIFY
    uses, so that T-CERTIFY at t = 1 is bit-equal to CERTIFY.
    """
    if not pa > 0.5:
        return 0.0
    if pb >= 1.0 - pa:
        return sigma * float(special.ndtri(pa))
    return 0.5 * sigma * (float(special.ndtri(pa)) - float(special.ndtri(pb)))


def effective_pb_bound(mode: str, pb_bound: str) -> str:
    """The runner-up bound ``mode`` really uses: ``paper`` always keeps eq. 14 ("sum")."""
    if pb_bound not in PB_BOUNDS:
        raise ValueError(f"pb_bound={pb_bound!r}: must be one of {', '.join(PB_BOUNDS)}")
    return "sum" if mode == "paper" else pb_bound


def _split_bounds(nA: int, others: np.ndarray, n: int, level: float, t: float,
                  pb_bound: str = "sum") -> tuple[float, float, float]:
    """(a', pA_lower(a'), min(pB_upper(level - a'), 1 - pA_lower)) for the split a' = t * level;
    pB_upper is eq. 14 (``pb_bound="sum"``) or the CP bound of the largest other count ("max")."""
    a_prime = t * level
    pa = pA_lower(nA, n, a_prime)
    pb = min(runner_up_upper(others, n, level - a_prime, pb_bound), 1.0 - pa)
    return a_prime, pa, pb


def _best_split(nA: int, others: np.ndarray, n: int, sigma: float, level: float,
                grid: tuple[float, ...], pb_bound: str = "sum") -> tuple[float, float, float, float, float]:
    """(radius, t, a', pA_lower, pB_upper) of the grid point with the largest radius; ties -> larger t."""
    best: tuple[float, float, float, float, float] | None = None
    for t in sorted(set(grid), reverse=True):
        a_prime, pa, pb = _split_bounds(nA, others, n, level, t, pb_bound)
        radius = split_radius(sigma, pa, pb)
        if best is None or radius > best[0]:
            best = (radius, t, a_prime, pa, pb)
    assert best is not None
    return best


def bonferroni_level(alpha: float, grid: Sequence[float]) -> float:
    """alpha / (t_max + 1 - t_min): the level at which the max over ``grid`` fails with prob. <= alpha."""
    return alpha / (max(grid) + 1.0 - min(grid))


def split_margin(pa: float, pb: float) -> float:
    """Phi^-1(pa) - Phi^-1(pb) with pb clipped to 1 - pa: 2 radius / sigma, without the cut at pa = 1/2.

    A continuous score for choosing t: it still ranks the splits when every plug-in radius is 0.
    """
    if pb >= 1.0 - pa:
        return 2.0 * float(special.ndtri(pa))
    return float(special.ndtri(pa)) - float(special.ndtri(pb))


def pilot_choice(pilot: np.ndarray, cA: int, n: int, alpha: float, grid: tuple[float, ...],
                 pb_bound: str = "sum") -> float:
    """The t maximizing the plug-in margin: counts round(n * pilot / n0) at level alpha (ties -> larger t).

    The score is ``split_margin`` (the radius up to the factor sigma / 2, where pA_lower > 1/2) so that a
    pilot whose plug-in pA_lower is below 1/2 still picks a sensible t. It uses the pilot draws only, so
    the choice is independent of the estimation counts. With no pilot draws it returns max(grid).
    """
    n0 = int(pilot.sum())
    if n0 == 0:
        return max(grid)
    plug = np.minimum(np.rint(pilot * (n / n0)).astype(np.int64), n)
    nA, others = int(plug[cA]), np.delete(plug, cA)
    best_t, best_score = max(grid), -math.inf
    for t in sorted(set(grid), reverse=True):
        _, pa, pb = _split_bounds(nA, others, n, alpha, t, pb_bound)
        score = split_margin(pa, pb) if pa > 0 else -math.inf
        if score > best_score:
            best_t, best_score = t, score
    return best_t


def tcertify_counts(pilot_counts: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray,
                    sigma: float, alpha: float, mode: str = "pilot",
                    grid: Sequence[float] = DEFAULT_GRID, pb_bound: str = "sum") -> SmoothingResult:
    """T-CERTIFY: split alpha between pA_lower (a' = t alpha) and the runner-up bound pB_upper (alpha - a').

    ``pb_bound``: ``sum`` = eq. 14, ``max`` = Clopper-Pearson bound of the largest other count (valid and
    never looser; see ``adre_ray.smoothing.bounds``). ``paper`` mode always uses eq. 14.

    ``mode`` picks t (see the module docstring): ``pilot`` and ``bonferroni`` are valid at alpha,
    ``paper`` (grid max at alpha) only at alpha (t_max + 1 - t_min). Returns the record of the chosen t
    (``alpha_prime`` = the a' used); abstains when the radius is 0. Needs at least two classes.
    With ``grid=(1.0,)`` every mode returns CERTIFY's class and radius exactly.
    """
    pilot, main, n = _check_pair(pilot_counts, counts)
    sigma, alpha = check_sigma(sigma), check_alpha(alpha)
    mode, grid = _check_mode(mode), check_grid(grid)
    pb_bound = effective_pb_bound(mode, pb_bound)
    if main.size < 2:
        raise ValueError(f"counts={_short(counts)}: T-CERTIFY needs at least 2 classes")
    cA = int(np.argmax(pilot))
    nA, others = int(main[cA]), np.delete(main, cA)
    if mode == "pilot":
        t = pilot_choice(pilot, cA, n, alpha, grid, pb_bound)
        a_prime, pa, pb = _split_bounds(nA, others, n, alpha, t, pb_bound)
        radius = split_radius(sigma, pa, pb)
    else:
        level = alpha if mode == "paper" else bonferroni_level(alpha, grid)
        radius, t, a_prime, pa, pb = _best_split(nA, others, n, sigma, level, grid, pb_bound)
    return SmoothingResult(
        predict=cA if radius > 0 else ABSTAIN, radius=radius, pA_lower=pa, pB_upper=pb, alpha_prime=a_prime,
        mode=mode, candidate=cA, n_A=nA, n=n, t=t, alpha=alpha, pb_bound=pb_bound,
    )
