"""Sequential certification: stop an image's main draws once its row of the table, or a target radius,
is decided (no torch, no Ray, no config: pure functions of counts and settings).

The main draws of an image arrive in shards; the looks are after 1, 2, 4, 8, ... shards and at the last
shard (``look_schedule``): fixed positions, known before any draw. With N_w = count of the pilot class
cA after m_w draws, R = N_n - N_w ~ Bin(n - m_w, p_A) is independent of N_w (disjoint draws). Proofs in
docs/certification.md ("Sequential certification").

Boundary resolution (``resolve_below`` / ``resolve_above``), the one tool of every rule here. For a
final count threshold K (the full run is on the upper side iff N_n >= K) and a look (m, r = n - m):

- "below" at level eta: N_w <= c_hi, c_hi the largest a with sup_p P(Bin(m, p) <= a) P(Bin(r, p) >= K - a)
  <= eta. Then P(N_w <= c_hi and N_n >= K) <= P(N_w <= c_hi) P(R >= K - c_hi) <= eta for every p_A
  (independence; the product grows with a, so the event "resolved below" is exactly N_w <= c_hi);
- "above": N_w >= c_lo, by the mirror argument on the failures m - N_w, n - N_n.

The sup over p is bounded rigorously on a grid: on [p_i, p_i+1] the decreasing factor is <= its value at
p_i and the increasing one <= its value at p_i+1 (``_sup_product``).

Rules:

- ``early_abstain_threshold``: the tighter early-abstain test (boundary K = CERTIFY's certification
  threshold, "below" at the per-check level). The previous rule bounded the same event by
  min(P(N_w <= c), P(R >= K - c)) instead of the product, wasting most of its delta.
- ``DecidePlan`` (``--stop-when-decided``): the boundaries are the counts K_j at which the full-n CERTIFY
  radius reaches each radius g_j of the decide grid (``grid_thresholds``). An image stops at look w when
  every boundary is resolved (table change <= ``delta`` per image: ``delta / ((W - 1) 2 J)`` per boundary
  side and early look) and CERTIFY on the draws made, at the early level ``eps / (W - 1)``, lands in the
  decided bucket. The last look uses ``alpha - eps``, where ``eps`` is the largest spend that leaves
  every K_j unchanged (``final_level``): an image that is never stopped gets exactly the plain run's
  bucket, and every reported certificate is valid at alpha overall (union bound over the looks).
- ``TargetPlan`` (``--target-radius r``): accept (``certified``) when CERTIFY on the draws made reaches r
  at the look's level, reject (``not_certified``) when the one-sided Clopper-Pearson upper bound of p_A is
  below Phi(r / sigma) at that level, ``abstain`` when the n draws end undecided. Levels: alpha / 2 at the
  last look, alpha / (2 (W - 1)) at each earlier one: a wrong accept (or a wrong reject) has probability
  <= alpha.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from adre_ray.smoothing.bounds import cp_upper, pA_lower

DECISIONS = ("certified", "not_certified", "abstain")
"""Values of a target-radius row's ``decision``."""

RADIUS_TOL = 1e-9
"""A radius counts as reaching g when radius >= g - RADIUS_TOL (as in the certified-accuracy table)."""

DEFAULT_DECIDE_STEP = 0.25
"""Spacing of the default decide grid: 0, 0.25, 0.5, ... (the ``analyze`` table's radii)."""

_GRID_POINTS = 2048


# ------------------------------------------------------------------------------------------ the looks


def look_schedule(num_shards: int) -> tuple[int, ...]:
    """Shards summed at each look: 1, 2, 4, ... below ``num_shards``, then ``num_shards`` (the full run)."""
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards!r}: must be >= 1")
    looks, s = [], 1
    while s < num_shards:
        looks.append(s)
        s *= 2
    return (*looks, num_shards)


def draws_at_looks(n: int, shard_size: int) -> tuple[int, ...]:
    """Main draws made at each look of an image with n draws in shards of ``shard_size``."""
    return tuple(min(n, s * shard_size) for s in look_schedule(-(-n // shard_size)))


# --------------------------------------------------------------------------------- CERTIFY on a count


def certify_radius(n_A: int, n: int, sigma: float, level: float) -> float:
    """CERTIFY's radius sigma Phi^-1(pA_lower(n_A, n, level)), or -inf when it abstains (pA_lower < 1/2);
    the very expressions of ``certify_counts``."""
    pa = pA_lower(n_A, n, level)
    return sigma * float(special.ndtri(pa)) if pa >= 0.5 else -math.inf


def reaches(radius: float, g: float) -> bool:
    """radius >= g in the table's sense (abstention, -inf, reaches nothing)."""
    return radius >= g - RADIUS_TOL


def count_threshold(n: int, sigma: float, level: float, g: float) -> int:
    """K = min { k : CERTIFY with k of n draws at ``level`` reaches radius g }, n + 1 when none does."""
    if not reaches(certify_radius(n, n, sigma, level), g):
        return n + 1
    lo, hi = -1, n  # reaches(hi); lo = -1 stands for "no count"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reaches(certify_radius(mid, n, sigma, level), g):
            hi = mid
        else:
            lo = mid
    return hi


def max_certifiable_radius(n: int, sigma: float, level: float) -> float:
    """sigma Phi^-1(level^(1/n)): CERTIFY's radius when all n draws are cA (0 if even that abstains)."""
    return max(0.0, certify_radius(n, n, sigma, level))


def default_decide_grid(n: int, sigma: float, alpha: float, step: float = DEFAULT_DECIDE_STEP
                        ) -> tuple[float, ...]:
    """0, step, 2 step, ... up to the largest radius certifiable with n draws (``analyze``'s radii)."""
    top = max_certifiable_radius(n, sigma, alpha)
    return tuple(round(step * i, 10) for i in range(int(math.floor(top / step + RADIUS_TOL)) + 1))


def check_decide_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """The radii sorted, with 0 (the abstention boundary) added; ValueError naming a bad value."""
    values = tuple(grid)
    for g in values:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"decide_grid={list(values)!r}: value {g!r} is not a finite radius >= 0")
    return tuple(sorted({0.0, *(float(g) for g in values)}))


def grid_thresholds(n: int, sigma: float, level: float, grid: Sequence[float]) -> tuple[int, ...]:
    """K_j for each radius of ``grid`` (sorted, 0 first): bucket(N_n) = #{j : N_n >= K_j}."""
    return tuple(count_threshold(n, sigma, level, g) for g in grid)


def bucket(n_A: int, thresholds: Sequence[int]) -> int:
    """Number of grid radii CERTIFY reaches with count n_A (0 = abstains / below the first radius)."""
    return sum(n_A >= k for k in thresholds)


def final_level(n: int, sigma: float, alpha: float, grid: Sequence[float]) -> float:
    """The smallest level a' <= alpha with the same K_j as alpha for every grid radius.

    CERTIFY with count k reaches g at level a iff P(Bin(n, p_g) >= k) <= a (Clopper-Pearson duality,
    p_g = Phi(g / sigma)), so lowering the level to max_j P(Bin(n, p_j) >= K_j) keeps every K_j; the
    value is then checked with the very radius function of the rows, and raised towards alpha until the
    thresholds agree (float rounding). The early looks may spend alpha - a'.
    """
    wanted = grid_thresholds(n, sigma, alpha, grid)
    tails = [float(special.bdtrc(k - 1, n, special.ndtr(g / sigma) if g > 0 else 0.5))
             for g, k in zip(grid, wanted, strict=True) if k <= n]
    level = min(alpha, max(tails, default=alpha))
    for _ in range(60):
        if level > 0 and grid_thresholds(n, sigma, level, grid) == wanted:
            return level
        level = level + (alpha - level) / 2 if level > 0 else alpha / 2
    return alpha


# ------------------------------------------------------------------------------ boundary resolution


def _p_grid(a: int, m: int, need: int, r: int) -> np.ndarray:
    """Points of [0, 1], dense where P(Bin(m, p) <= a) and P(Bin(r, p) >= need) cross."""
    lo, hi = sorted((a / m, min(1.0, need / r)))
    width = 12 * math.sqrt(max(lo * (1 - lo), hi * (1 - hi), 1.0 / min(m, r)) / min(m, r)) + 12 / min(m, r)
    dense = np.linspace(max(0.0, lo - width), min(1.0, hi + width), _GRID_POINTS)
    return np.unique(np.concatenate([np.linspace(0.0, 1.0, 257), dense, [lo, hi]]))


def _sup_product(a: int, m: int, need: int, r: int) -> float:
    """A rigorous upper bound of sup_p P(Bin(m, p) <= a) P(Bin(r, p) >= need).

    The first factor decreases in p, the second increases, so on [p_i, p_i+1] the product is at most
    first(p_i) * second(p_i+1); the bound is the max of that over a grid holding 0 and 1.
    """
    if need <= 0:
        return float(special.bdtr(a, m, 1.0)) if a < m else 1.0
    if need > r:
        return 0.0
    if a >= m:
        return 1.0
    p = _p_grid(a, m, need, r)
    first = special.bdtr(a, m, p)
    second = special.bdtrc(need - 1, r, p)
    return float(np.max(first[:-1] * second[1:]))


@functools.lru_cache(maxsize=65536)
def resolve_below(m: int, n: int, threshold: int, eta: float) -> int:
    """c_hi: the largest count a <= m with sup_p P(Bin(m, p) <= a) P(Bin(n - m, p) >= K - a) <= eta
    (-1 when none). N_w <= c_hi resolves the boundary K below: P(N_w <= c_hi and N_n >= K) <= eta."""
    r = n - m
    lo, hi = -1, min(m, threshold - 1) + 1  # lo resolves (vacuously), hi does not (a >= K: N_n >= K)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _sup_product(mid, m, threshold - mid, r) <= eta:
            lo = mid
        else:
            hi = mid
    return lo


def resolve_above(m: int, n: int, threshold: int, eta: float) -> int:
    """c_lo: the smallest count a with P(N_w >= c_lo and N_n < K) <= eta for every p_A (m + 1 when none):
    ``resolve_below`` on the failures (m - N_w, n - N_n, whose boundary is n - K + 1)."""
    if threshold > n:
        return m + 1
    return m - resolve_below(m, n, n - threshold + 1, eta)


# ----------------------------------------------------------------------------------- early abstain


def early_abstain_threshold(m: int, n: int, threshold: int, level: float) -> int:
    """Stop (abstain) iff N_w <= this, after m of n draws; K = ``threshold`` is CERTIFY's certification
    count. Certain stops (K - N_w > n - m) for ``level`` = 0; otherwise the product rule at ``level``."""
    if level <= 0:
        return threshold - (n - m) - 1
    return max(resolve_below(m, n, threshold, level), threshold - (n - m) - 1)


# ------------------------------------------------------------------------------- table-decided stop


@dataclass(frozen=True)
class Stop:
    """A look's verdict: stop or go on; the level at which the row's CERTIFY / T-CERTIFY are computed
    and the decided bucket (``None`` while going on; bucket 0 with ``abstain`` = report an abstention)."""

    stop: bool
    level: float
    bucket: int | None = None
    abstain: bool = False
    decision: str | None = None


@dataclass(frozen=True)
class DecidePlan:
    """Table-decided stopping for images of n main draws (one plan per n; build with ``decide_plan``)."""

    n: int
    sigma: float
    alpha: float
    grid: tuple[float, ...]
    looks: tuple[int, ...]  # main draws at each look, the last = n
    thresholds: tuple[int, ...]  # K_j at the final level (= at alpha)
    final: float  # level of the last look
    early: float  # level of each earlier look's certificate
    eta: float  # per boundary side and early look: bound on a wrong resolution

    def check(self, n_A: int, m: int) -> Stop:
        """After m draws with n_A of them cA: stop with the decided bucket, or go on."""
        if m >= self.n:
            return Stop(True, self.final)
        if m not in self.looks:
            raise ValueError(f"m={m}: not a look of this plan ({list(self.looks)})")
        decided = 0
        for k in self.thresholds:
            if n_A >= resolve_above(m, self.n, k, self.eta):
                decided += 1
            elif n_A > resolve_below(m, self.n, k, self.eta):
                return Stop(False, self.final)  # boundary k still open
        if decided == 0:
            return Stop(True, self.early, 0, abstain=True)
        if self.early > 0 and bucket_of_radius(certify_radius(n_A, m, self.sigma, self.early),
                                                self.grid) == decided:
            return Stop(True, self.early, decided)
        return Stop(False, self.final)


def bucket_of_radius(radius: float, grid: Sequence[float]) -> int:
    """Number of grid radii that ``radius`` reaches."""
    return sum(reaches(radius, g) for g in grid)


@functools.lru_cache(maxsize=256)
def decide_plan(n: int, shard_size: int, sigma: float, alpha: float, grid: tuple[float, ...] | None,
                delta: float) -> DecidePlan:
    """The plan for n draws: looks, thresholds, levels (``grid`` None: ``default_decide_grid``)."""
    radii = check_decide_grid(default_decide_grid(n, sigma, alpha) if grid is None else grid)
    looks = draws_at_looks(n, shard_size)
    early_looks = len(looks) - 1
    final = final_level(n, sigma, alpha, radii) if early_looks else alpha
    thresholds = grid_thresholds(n, sigma, final, radii)
    early = (alpha - final) / early_looks if early_looks else 0.0
    eta = delta / (early_looks * 2 * len(radii)) if early_looks else 0.0
    return DecidePlan(n, sigma, alpha, radii, looks, thresholds, final, early, eta)


# ---------------------------------------------------------------------------------- target radius


@dataclass(frozen=True)
class TargetPlan:
    """Sequential test of "CERTIFY reaches radius r" for images of n main draws."""

    n: int
    sigma: float
    alpha: float
    radius: float
    looks: tuple[int, ...]

    def level(self, m: int) -> float:
        """alpha / 2 at the last look, alpha / (2 (W - 1)) at each earlier one (all of alpha at W = 1)."""
        early = len(self.looks) - 1
        if early == 0:
            return self.alpha
        return self.alpha / 2 if m >= self.n else self.alpha / (2 * early)

    def check(self, n_A: int, m: int) -> Stop:
        """After m draws with n_A of them cA: ``certified`` / ``not_certified`` (stop), or go on; at the
        last look an undecided image ends as ``abstain``."""
        level = self.level(m)
        if reaches(certify_radius(n_A, m, self.sigma, level), self.radius):
            return Stop(True, level, decision="certified")
        p_r = float(special.ndtr(self.radius / self.sigma)) if self.radius > 0 else 0.5
        if cp_upper(n_A, m, level) < p_r:
            return Stop(True, level, decision="not_certified")
        if m >= self.n:
            return Stop(True, level, decision="abstain")
        return Stop(False, level)


def target_plan(n: int, shard_size: int, sigma: float, alpha: float, radius: float) -> TargetPlan:
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"target_radius={radius!r}: must be a finite radius >= 0")
    return TargetPlan(n, sigma, alpha, float(radius), draws_at_looks(n, shard_size))


__all__ = [
    "DECISIONS", "DEFAULT_DECIDE_STEP", "RADIUS_TOL", "DecidePlan", "Stop", "TargetPlan", "bucket",
    "bucket_of_radius", "certify_radius", "check_decide_grid", "count_threshold", "decide_plan",
    "default_decide_grid", "draws_at_looks", "early_abstain_threshold", "final_level", "grid_thresholds",
    "look_schedule", "max_certifiable_radius", "reaches", "resolve_above", "resolve_below", "target_plan",
]
