"""Sequential certification on counts (no Ray, no model): adre_ray.smoothing.sequential.

Coverage simulations in the style of tests/test_coverage.py: fixed seeds, adversarial p_A (just above and
below every bucket threshold, near 1/2, 1,000 classes), allowance = level + 3 sqrt(level (1 - level) /
trials). Levels are large (alpha = 0.1, delta = 0.05) so that a violation would be visible in a few
thousand trials; each test also shows that the allowance catches a rule that does not pay for its looks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from adre_ray.smoothing import certify_counts, tcertify_counts
from adre_ray.smoothing.sequential import (
    bucket,
    bucket_of_radius,
    certify_radius,
    check_decide_grid,
    count_threshold,
    decide_plan,
    default_decide_grid,
    draws_at_looks,
    final_level,
    grid_thresholds,
    look_schedule,
    resolve_above,
    resolve_below,
    target_plan,
)
from adre_ray.smoothing.shortcuts import (
    certify_threshold,
    should_stop_early,
    should_stop_early_cp,
    wave_level,
)

SIGMA, ALPHA, DELTA = 0.5, 0.1, 0.05
N, SHARD, TRIALS = 4_000, 250, 3_000


def allowance(level: float, trials: int) -> float:
    return level + 3 * math.sqrt(level * (1 - level) / trials)


def test_looks_double_and_end_at_n():
    assert look_schedule(1) == (1,) and look_schedule(16) == (1, 2, 4, 8, 16)
    assert look_schedule(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert draws_at_looks(4_000, 250) == (250, 500, 1000, 2000, 4000)
    assert draws_at_looks(2_100, 1_000) == (1000, 2000, 2100)
    with pytest.raises(ValueError, match="num_shards=0"):
        look_schedule(0)


def test_thresholds_match_certify_counts_exactly():
    """K_j is the smallest count whose CERTIFY row (certify_counts) reaches radius g_j."""
    grid = check_decide_grid([0.25, 0.5, 0.75])
    assert grid == (0.0, 0.25, 0.5, 0.75)
    for n, level in ((4_000, 0.1), (100_000, 0.001), (2_000, 1e-6)):
        for g, k in zip(grid, grid_thresholds(n, SIGMA, level, grid), strict=True):
            if k <= n:
                at = certify_counts([0, 1], [n - k, k], SIGMA, level)
                assert at.predict == 1 and at.radius >= g - 1e-9
            below = certify_counts([0, 1], [n - k + 1, k - 1], SIGMA, level)
            assert below.predict < 0 or below.radius < g - 1e-9
    assert count_threshold(100_000, 1.0, 0.001, 0.0) == certify_threshold(100_000, 0.001)
    assert default_decide_grid(100_000, 0.25, 0.001) == (0.0, 0.25, 0.5, 0.75)  # tops out at 3.81 sigma
    with pytest.raises(ValueError, match="decide_grid"):
        check_decide_grid([0.5, -1])


@pytest.mark.parametrize("n,sigma,alpha", [(4_000, 0.5, 0.1), (100_000, 0.25, 0.001), (100_000, 1.0, 0.001)])
def test_final_level_keeps_every_bucket_threshold(n, sigma, alpha):
    """The last look's level: below alpha, and every count lands in the same bucket as at alpha."""
    grid = default_decide_grid(n, sigma, alpha)
    final = final_level(n, sigma, alpha, grid)
    assert final < alpha
    assert grid_thresholds(n, sigma, final, grid) == grid_thresholds(n, sigma, alpha, grid)
    counts = np.random.default_rng(0).integers(n // 2, n + 1, size=300)
    for k in counts:
        assert bucket_of_radius(certify_radius(int(k), n, sigma, final), grid) == \
            bucket_of_radius(certify_radius(int(k), n, sigma, alpha), grid)


@pytest.mark.parametrize("m,n,k", [(200, 1_000, 520), (500, 2_000, 1_900), (50, 400, 100)])
def test_boundary_resolution_bound_holds_for_every_p(m, n, k):
    """P(resolved below and N_n >= K) and P(resolved above and N_n < K), computed exactly from the two
    independent binomials, stay <= eta on a fine grid of p (the rigorous grid bound is what is proven)."""
    eta = 1e-3
    c_hi, c_lo = resolve_below(m, n, k, eta), resolve_above(m, n, k, eta)
    assert -1 <= c_hi < c_lo <= m + 1
    r = n - m
    for p in np.linspace(0.0005, 0.9995, 1999):
        a = np.arange(m + 1)
        pm = stats.binom.pmf(a, m, p)
        below = np.sum(pm[a <= c_hi] * stats.binom.sf(k - a[a <= c_hi] - 1, r, p))
        above = np.sum(pm[a >= c_lo] * stats.binom.cdf(k - a[a >= c_lo] - 1, r, p))
        assert below <= eta * (1 + 1e-9) and above <= eta * (1 + 1e-9)
    assert c_hi >= 0 and c_lo <= m  # not vacuous: some counts resolve each side


def test_product_rule_stops_whenever_the_cp_rule_does_and_earlier():
    """Item 3: the same delta, every cp stop is a product stop, and the product rule stops more."""
    n, level = 20_000, wave_level(1e-4, 9)
    k = certify_threshold(n, 0.001)
    more = 0
    for m in range(2_000, n, 2_000):
        for a in range(int(0.40 * m), int(0.52 * m), 3):
            cp, product = should_stop_early_cp(a, m, n, k, level), should_stop_early(a, m, n, k, level)
            assert product or not cp
            more += product and not cp
    assert more > 0
    with pytest.raises(ValueError, match="early_abstain_rule='x'"):
        should_stop_early(1, 2, 10, 5, 0.1, rule="x")


def _p_at(g: float, n: int, sigma: float, alpha: float, offset: float) -> float:
    """p_A just above (offset > 0) or below the probability at which the full run reaches g half the time."""
    k = count_threshold(n, sigma, alpha, g)
    return min(1.0, max(0.0, k / n + offset))


GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # default_decide_grid(N, SIGMA, ALPHA)
JUST_BELOW = [float(special.ndtr(g / SIGMA)) - 1e-4 for g in GRID[1:]]  # true radius just below g: validity
ADVERSARIAL = [0.45, 0.5, 0.505, 0.52] + JUST_BELOW + [
    _p_at(g, N, SIGMA, ALPHA, 0.0) for g in GRID] + [_p_at(g, N, SIGMA, ALPHA, d) for g in (0.0, 1.0)
                                                      for d in (-0.004, 0.004)]


def run_decided(plan, cum: np.ndarray, shard: int):
    """(stop verdict, draws made, cA count at the stop) of one image whose cumulative shard counts are cum."""
    for m in plan.looks:
        n_a = int(cum[-(-m // shard) - 1])
        verdict = plan.check(n_a, m)
        if verdict.stop:
            return verdict, m, n_a
    raise AssertionError("the last look always stops")


@pytest.mark.parametrize("p_a", ADVERSARIAL)
def test_decided_rows_are_valid_at_alpha_and_change_the_table_at_most_delta(p_a):
    plan = decide_plan(N, SHARD, SIGMA, ALPHA, None, DELTA)
    true_radius = SIGMA * special.ndtri(p_a) if p_a > 0.5 else -math.inf
    rng = np.random.default_rng(int(p_a * 1e6))
    cum = rng.binomial(SHARD, p_a, size=(TRIALS, N // SHARD)).cumsum(axis=1)
    assert plan.grid == GRID
    failures = changes = naive_failures = 0
    for row in cum:
        verdict, m, n_a = run_decided(plan, row, SHARD)
        radius = -math.inf if verdict.abstain else certify_radius(n_a, m, SIGMA, verdict.level)
        failures += radius > true_radius + 1e-12
        full = bucket_of_radius(certify_radius(int(row[-1]), N, SIGMA, ALPHA), plan.grid)
        changes += bucket_of_radius(radius, plan.grid) != full
        # a rule that does not pay for its looks: claim 0.5 at the first look whose CERTIFY at alpha does
        naive_failures += true_radius < 0.5 and any(
            certify_radius(int(row[s // SHARD - 1]), s, SIGMA, ALPHA) >= 0.5 for s in plan.looks)
    assert failures / TRIALS <= allowance(ALPHA, TRIALS)
    assert changes / TRIALS <= allowance(DELTA, TRIALS)
    if p_a == JUST_BELOW[1]:  # the allowance catches the unpaid looks
        assert naive_failures / TRIALS > allowance(ALPHA, TRIALS)


def test_decided_saves_draws_where_the_bucket_is_clear():
    plan = decide_plan(N, SHARD, SIGMA, ALPHA, None, DELTA)
    rng = np.random.default_rng(5)
    for p_a, most in ((0.2, 250), (0.78, 1000)):  # abstains; true radius 0.39 (bucket 0.25) with margin
        made = [run_decided(plan, row, SHARD)[1]
                for row in rng.binomial(SHARD, p_a, size=(200, N // SHARD)).cumsum(axis=1)]
        assert np.mean(made) <= most


def test_decided_with_1000_classes_keeps_tcertify_valid():
    """T-CERTIFY on the draws made at the stopping look's level: valid at alpha with 1,000 classes."""
    n, shard, trials = 2_000, 250, 1_500
    plan = decide_plan(n, shard, SIGMA, ALPHA, None, DELTA)
    probs = np.full(1000, 0.38 / 998)
    probs[0], probs[1] = 0.6, 0.02
    true_radius = SIGMA / 2 * (special.ndtri(0.6) - special.ndtri(0.02))
    rng = np.random.default_rng(11)
    failures = 0
    for _ in range(trials):
        pilot = rng.multinomial(100, probs)
        shards = rng.multinomial(shard, probs, size=n // shard).cumsum(axis=0)
        verdict, m, _ = run_decided(plan, shards[:, int(np.argmax(pilot))], shard)
        if verdict.abstain:
            continue
        t = tcertify_counts(pilot, shards[m // shard - 1], SIGMA, verdict.level, mode="pilot", pb_bound="max")
        failures += t.predict >= 0 and (t.predict != 0 or t.radius > true_radius + 1e-12)
    assert failures / trials <= allowance(ALPHA, trials)


@pytest.mark.parametrize("offset", [-0.01, -0.001, 0.0, 0.001, 0.01])
def test_target_radius_wrong_accepts_and_rejects_stay_below_alpha(offset):
    r = 0.5
    plan = target_plan(N, SHARD, SIGMA, ALPHA, r)
    p_r = float(special.ndtr(r / SIGMA))
    p_a = p_r + offset
    rng = np.random.default_rng(int(1e4 * (offset + 1)))
    cum = rng.binomial(SHARD, p_a, size=(TRIALS, N // SHARD)).cumsum(axis=1)
    accepts = rejects = naive = 0
    for row in cum:
        for m in plan.looks:
            verdict = plan.check(int(row[m // SHARD - 1]), m)
            if verdict.stop:
                accepts += verdict.decision == "certified"
                rejects += verdict.decision == "not_certified"
                break
        naive += any(certify_radius(int(row[m // SHARD - 1]), m, SIGMA, ALPHA) >= r for m in plan.looks)
    if p_a < p_r:
        assert accepts / TRIALS <= allowance(ALPHA, TRIALS)
        if offset == -0.001:  # accepting at alpha at every look, without spending, is caught
            assert naive / TRIALS > allowance(ALPHA, TRIALS)
    if p_a >= p_r:
        assert rejects / TRIALS <= allowance(ALPHA, TRIALS)


def test_target_radius_decides_early_with_margin():
    plan = target_plan(100_000, 1_000, 0.25, 0.001, 0.25)
    assert plan.check(1_000, 1_000).decision == "certified"
    assert plan.check(500, 1_000).decision == "not_certified"
    assert plan.check(86_000, 100_000).decision in ("abstain", "certified")
    with pytest.raises(ValueError, match="target_radius=-1"):
        target_plan(100, 10, 0.25, 0.001, -1.0)
    assert bucket(10, (5, 10, 20)) == 2
