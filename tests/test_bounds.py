"""pA_lower / pB_upper against independent computations (scipy Beta quantiles, a plain bisection)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from adre_ray.smoothing import cp_upper, pA_lower, pB_upper


def bisect_sum_bound(other_counts: np.ndarray, n: int, beta: float, iters: int = 100) -> float:
    """inf {p : sum_j P(Bin(n, p) <= N_j) <= beta} by plain bisection on scipy.stats.binom.cdf.

    Written independently of the implementation: no bracketing tricks, no grouping, no edge cases beyond
    the definition (the sum is non-increasing in p, so keep the invariant S(lo) > beta >= S(hi)).
    """
    def total(p: float) -> float:
        return float(stats.binom.cdf(other_counts, n, p).sum())

    if total(0.0) <= beta:
        return 0.0
    if total(1.0) > beta:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if total(mid) > beta:
            lo = mid
        else:
            hi = mid
    return hi


# ------------------------------------------------------------------------------------------- pA_lower

def test_pA_lower_equals_beta_quantile():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200_000, size=500)
    nA = np.minimum(n, (rng.random(500) * (n + 1)).astype(np.int64))
    alpha = rng.uniform(1e-6, 0.5, size=500)
    got = np.array([pA_lower(int(a), int(b), float(c)) for a, b, c in zip(nA, n, alpha, strict=True)])
    want = np.where(nA == 0, 0.0, stats.beta.ppf(alpha, np.maximum(nA, 1), n - nA + 1))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


def test_pA_lower_closed_forms():
    # nA = 0: no evidence, bound 0. nA = n: P(Bin(n, p) = n) = p^n = alpha  ->  p = alpha^(1/n).
    assert pA_lower(0, 10, 0.05) == 0.0
    for n in (1, 7, 100, 100_000):
        assert pA_lower(n, n, 0.001) == pytest.approx(0.001 ** (1 / n), rel=1e-13)


def test_pA_lower_is_a_valid_lower_bound():
    # The CP bound is the smallest p with P(Bin(n, p) >= nA) > alpha: at the bound the tail equals alpha.
    n, alpha = 1000, 0.01
    for nA in (1, 10, 500, 999):
        p = pA_lower(nA, n, alpha)
        assert stats.binom.sf(nA - 1, n, p) == pytest.approx(alpha, rel=1e-9)
        assert p <= nA / n


# ------------------------------------------------------------------------------------------- pB_upper

def test_pB_upper_one_class_is_clopper_pearson():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 50_000))
        N = int(rng.integers(0, n))  # N < n (N = n is the edge case below)
        beta = float(rng.uniform(1e-6, 0.5))
        want = stats.beta.ppf(1 - beta, N + 1, n - N)
        assert abs(pB_upper([N], n, beta) - want) < 1e-12
        assert abs(cp_upper(N, n, beta) - want) < 1e-12


def test_pB_upper_matches_bisection_random_vectors():
    rng = np.random.default_rng(2)
    for _ in range(120):
        classes = int(rng.choice([2, 3, 5, 10, 50]))
        n = int(rng.integers(1, 20_000))
        probs = rng.dirichlet(np.full(classes + 1, 0.5))
        others = rng.multinomial(n, probs)[1:]
        beta = float(rng.uniform(1e-4, 0.2))
        assert abs(pB_upper(others, n, beta) - bisect_sum_bound(others, n, beta)) < 1e-12


def test_pB_upper_thousand_classes_long_tail():
    # 1,000 classes: a top class, one runner-up and a Zipf tail; equal counts are grouped internally.
    rng = np.random.default_rng(3)
    tail = 1.0 / np.arange(1, 999) ** 1.1
    probs = np.concatenate([[0.6, 0.15], 0.25 * tail / tail.sum()])
    for n in (1_000, 10_000, 100_000):
        counts = rng.multinomial(n, probs)
        others = counts[1:]
        for beta in (1e-3, 0.05):
            got = pB_upper(others, n, beta)
            assert abs(got - bisect_sum_bound(others, n, beta)) < 1e-12
            assert got >= others.max() / n


def test_pB_upper_result_is_conservative():
    # The returned value is on the safe side of the root: S(result) <= beta.
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(2, 5000))
        others = rng.multinomial(n, rng.dirichlet(np.ones(6)))[1:]
        beta = float(rng.uniform(1e-3, 0.3))
        p = pB_upper(others, n, beta)
        assert stats.binom.cdf(others, n, p).sum() <= beta * (1 + 1e-9)


def test_pB_upper_edges():
    n = 50
    assert pB_upper([], n, 0.05) == 0.0  # no other class: the sum is empty
    assert pB_upper([3, 4], n, 0.0) == 1.0  # no budget: trivial bound
    assert pB_upper([3, 4], n, -0.1) == 1.0
    assert pB_upper([3, 4], n, 2.0) == 0.0  # S(p) <= m = 2 everywhere
    assert pB_upper([3, 4], n, 5.0) == 0.0
    assert pB_upper([n], n, 0.5) == 1.0  # P(Bin(n, p) <= n) = 1 > beta for every p
    assert pB_upper([n, 0], n, 0.99) == 1.0
    # S(p) = 1 + (1 - p)^n <= 1.5  ->  p = 1 - 0.5^(1/n)
    assert pB_upper([n, 0], n, 1.5) == pytest.approx(1 - 0.5 ** (1 / n), abs=1e-14)
    assert pB_upper([n, 0], n, 1.5) == pytest.approx(bisect_sum_bound(np.array([n, 0]), n, 1.5), abs=1e-12)
    # all zero: m (1 - p)^n = beta  ->  p = 1 - (beta / m)^(1/n)
    for m in (1, 9, 999):
        want = 1 - (0.05 / m) ** (1 / n)
        assert pB_upper(np.zeros(m, dtype=np.int64), n, 0.05) == pytest.approx(want, abs=1e-14)
    assert pB_upper([0], 1, 0.05) == pytest.approx(0.95, abs=1e-14)  # n = 1: S(p) = 1 - p


def test_pB_upper_monotone():
    others, n = np.array([40, 12, 3, 0]), 200
    values = [pB_upper(others, n, b) for b in (0.001, 0.01, 0.05, 0.2, 0.6, 1.5)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    more = [pB_upper(others + np.array([k, 0, 0, 0]), n, 0.05) for k in range(5)]
    assert all(a < b for a, b in zip(more, more[1:], strict=False))


def test_pB_upper_accepts_numpy_and_floats():
    ref = pB_upper([5, 2], 100, 0.05)
    assert pB_upper(np.array([5, 2], dtype=np.int32), np.int64(100), np.float64(0.05)) == ref
    assert pB_upper(np.array([5.0, 2.0]), 100, 0.05) == ref


# -------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: pA_lower(-1, 10, 0.05), "nA=-1"),
        (lambda: pA_lower(11, 10, 0.05), "nA=11"),
        (lambda: pA_lower(1, 0, 0.05), "n=0"),
        (lambda: pA_lower(1, 10, 0.0), "alpha=0.0"),
        (lambda: pA_lower(1, 10, 1.0), "alpha=1.0"),
        (lambda: pA_lower(1, 10, math.nan), "alpha=nan"),
        (lambda: pA_lower(1.5, 10, 0.05), "nA=1.5"),
        (lambda: pB_upper([3, -2], 10, 0.05), "other_counts=[3, -2]"),
        (lambda: pB_upper([3, 11], 10, 0.05), "other_counts=[3, 11]"),
        (lambda: pB_upper([3, 2], 0, 0.05), "n=0"),
        (lambda: pB_upper([3, 2.5], 10, 0.05), "other_counts=[3.0, 2.5]"),
        (lambda: pB_upper([[3, 2]], 10, 0.05), "other_counts=[[3, 2]]"),
        (lambda: pB_upper([3, 2], 10, math.nan), "beta=nan"),
    ],
)
def test_bad_input_names_the_value(call, needle):
    with pytest.raises(ValueError) as err:
        call()
    assert needle in str(err.value)
