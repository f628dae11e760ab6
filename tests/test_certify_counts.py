"""PREDICT / CERTIFY / T-CERTIFY on count vectors, and SmoothedClassifier end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

from adre_ray.smoothing import (
    ABSTAIN,
    DEFAULT_GRID,
    MAIN_STREAM,
    PILOT_STREAM,
    TCERTIFY_MODES,
    Certification,
    SmoothedClassifier,
    SmoothingResult,
    certify_counts,
    predict_counts,
    sample_counts,
    tcertify_counts,
)


def random_count_pairs(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pilot (n0 <= 100) and main (n <= 3000) counts from random Dirichlet class probabilities."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        classes = int(rng.choice([2, 3, 10, 100]))
        probs = rng.dirichlet(np.full(classes, float(rng.choice([0.2, 1.0, 5.0]))))
        n0, n = int(rng.integers(1, 101)), int(rng.integers(1, 3001))
        pairs.append((rng.multinomial(n0, probs), rng.multinomial(n, probs)))
    return pairs


# -------------------------------------------------------------------------------------------- PREDICT

def two_sided_binomial_p(nA: int, nB: int) -> float:
    """Exact two-sided p-value of Bin(nA + nB, 1/2) at nA >= nB: the law is symmetric, so 2 P(X >= nA)."""
    return min(1.0, 2.0 * stats.binom.sf(nA - 1, nA + nB, 0.5))


@pytest.mark.parametrize("counts", [[60, 40, 0], [70, 30, 5], [0, 3, 12, 9], [5, 5, 1], [500, 440, 60]])
def test_predict_matches_binomial_test(counts):
    alpha = 0.05
    top = int(np.argmax(counts))
    nA, nB = sorted(counts, reverse=True)[:2]
    p_value = two_sided_binomial_p(nA, nB)
    res = predict_counts(counts, alpha)
    assert res.p_value == pytest.approx(p_value, rel=1e-9)
    assert res.predict == (top if p_value <= alpha else ABSTAIN)
    assert (res.candidate, res.n_A, res.n, res.radius, res.mode) == (top, nA, sum(counts), 0.0, "predict")
    assert math.isnan(res.pA_lower) and math.isnan(res.pB_upper)


def test_predict_edges():
    assert predict_counts([0, 0, 0], 0.05).predict == ABSTAIN  # nothing observed
    assert predict_counts([7, 7], 0.5).predict == ABSTAIN  # a tie can never reject
    assert predict_counts([10], 0.01).predict == 0  # one class: p = 2 * 2^-10 < 0.01
    assert predict_counts([0, 10], 0.01).predict == 1


# -------------------------------------------------------------------------------------------- CERTIFY

def test_certify_closed_form_all_counts_on_top():
    # N_A = n: pA_lower = alpha^(1/n); radius = sigma Phi^-1(alpha^(1/n)).
    n, alpha, sigma = 1000, 0.001, 0.5
    res = certify_counts([0, 9, 1], [0, n, 0], sigma, alpha)
    assert res.predict == 1 and res.candidate == 1 and res.n_A == n and res.n == n
    assert res.pA_lower == pytest.approx(alpha ** (1 / n), rel=1e-13)
    assert res.radius == pytest.approx(sigma * stats.norm.ppf(alpha ** (1 / n)), rel=1e-12)
    assert res.pB_upper == 1 - res.pA_lower and res.alpha_prime == alpha and res.t == 1.0
    assert res.mode == "certify" and not res.abstained


def test_certify_uses_pilot_class_and_abstains_below_half():
    # The pilot picks class 0 (lowest index on a tie) although class 2 dominates the main counts.
    res = certify_counts([5, 0, 5], [10, 0, 90], 1.0, 0.01)
    assert res.candidate == 0 and res.predict == ABSTAIN and res.radius == 0.0 and res.n_A == 10
    assert res.pA_lower == pytest.approx(stats.beta.ppf(0.01, 10, 91), rel=1e-13)


def test_certify_matches_independent_formula_on_random_counts():
    for pilot, counts in random_count_pairs(300, seed=10):
        cA, n = int(np.argmax(pilot)), int(counts.sum())
        p = stats.beta.ppf(0.01, counts[cA], n - counts[cA] + 1) if counts[cA] > 0 else 0.0
        res = certify_counts(pilot, counts, 0.25, 0.01)
        assert res.pA_lower == pytest.approx(p, rel=1e-12, abs=0)
        if p < 0.5:
            assert (res.predict, res.radius) == (ABSTAIN, 0.0)
        else:
            assert res.predict == cA
            assert res.radius == pytest.approx(0.25 * stats.norm.ppf(p), rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------------------------ T-CERTIFY

def test_tcertify_two_classes_single_split_matches_formula():
    # One other class: pB_upper is the CP upper bound at alpha - a'. Hand-derived expectation.
    pilot, counts, sigma, alpha, t = [3, 17], [180, 820], 0.5, 0.01, 0.3
    res = tcertify_counts(pilot, counts, sigma, alpha, mode="paper", grid=(t,))
    a_prime = t * alpha
    pa = stats.beta.ppf(a_prime, 820, 1000 - 820 + 1)
    pb = min(stats.beta.ppf(1 - (alpha - a_prime), 181, 1000 - 180), 1 - pa)
    assert res.alpha_prime == pytest.approx(a_prime, rel=1e-15) and res.t == t
    assert res.pA_lower == pytest.approx(pa, rel=1e-12) and res.pB_upper == pytest.approx(pb, rel=1e-10)
    want = sigma / 2 * (stats.norm.ppf(pa) - stats.norm.ppf(pb))
    assert res.predict == 1 and res.radius == pytest.approx(want, rel=1e-10)


def test_tcertify_many_classes_beats_certify_when_runner_up_is_small():
    # Ten classes, runner-up far below 1 - pA: the eq. 14 bound is much tighter than 1 - pA_lower.
    counts = np.array([8000, 600, 400, 300, 200, 150, 130, 100, 70, 50])
    pilot = np.array([90, 4, 2, 1, 1, 1, 1, 0, 0, 0])
    cert = certify_counts(pilot, counts, 0.25, 0.001)
    for mode in TCERTIFY_MODES:
        res = tcertify_counts(pilot, counts, 0.25, 0.001, mode=mode)
        assert res.predict == 0 and res.radius > 1.2 * cert.radius
        assert res.pB_upper < 1 - res.pA_lower


def test_bonferroni_level_and_single_point_equivalence():
    pilot, counts = [1, 50, 3, 2], [40, 700, 160, 100]
    paper = tcertify_counts(pilot, counts, 1.0, 0.05, mode="paper", grid=(0.1, 0.5, 1.0))
    bonf = tcertify_counts(pilot, counts, 1.0, 0.05, mode="bonferroni", grid=(0.1, 0.5, 1.0))
    # the grid max at alpha / 1.9 equals the paper rule run at that smaller level
    at_level = tcertify_counts(pilot, counts, 1.0, 0.05 / 1.9, mode="paper", grid=(0.1, 0.5, 1.0))
    assert (bonf.radius, bonf.t, bonf.alpha_prime) == (at_level.radius, at_level.t, at_level.alpha_prime)
    assert bonf.alpha == 0.05 and bonf.radius < paper.radius
    for t in (0.2, 0.7):  # one grid point: t_max + 1 - t_min = 1, the level stays alpha
        one = tcertify_counts(pilot, counts, 1.0, 0.05, mode="bonferroni", grid=(t,))
        paper_one = tcertify_counts(pilot, counts, 1.0, 0.05, mode="paper", grid=(t,))
        assert one == dataclasses.replace(paper_one, mode="bonferroni") and one.radius > 0


def test_grid_one_equals_certify_exactly_for_every_mode():
    for pilot, counts in random_count_pairs(2000, seed=11):
        if counts.size < 2:
            continue
        cert = certify_counts(pilot, counts, 0.5, 0.01)
        for mode in TCERTIFY_MODES:
            res = tcertify_counts(pilot, counts, 0.5, 0.01, mode=mode, grid=(1.0,))
            assert (res.predict, res.radius, res.pA_lower) == (cert.predict, cert.radius, cert.pA_lower)
            assert res.alpha_prime == 0.01 and res.t == 1.0


def test_paper_never_below_certify_and_pilot_equals_certify_at_t_one():
    pilot_t_one = 0
    for pilot, counts in random_count_pairs(2500, seed=12):
        cert = certify_counts(pilot, counts, 0.5, 0.01)
        paper = tcertify_counts(pilot, counts, 0.5, 0.01, mode="paper")
        assert paper.radius >= cert.radius
        assert paper.predict in (cert.predict, cert.candidate)  # the class is always the pilot's cA
        pilot_res = tcertify_counts(pilot, counts, 0.5, 0.01, mode="pilot")
        assert pilot_res.candidate == cert.candidate
        if pilot_res.t == 1.0:
            pilot_t_one += 1
            assert (pilot_res.radius, pilot_res.predict) == (cert.radius, cert.predict)
    assert pilot_t_one > 0  # the branch above was exercised


def test_tcertify_abstains_with_zero_radius():
    res = tcertify_counts([10, 9], [510, 490], 1.0, 0.05, mode="paper")
    assert res.predict == ABSTAIN and res.radius == 0.0 and res.candidate == 0


def test_result_is_frozen():
    res = certify_counts([1, 0], [10, 0], 1.0, 0.1)
    assert isinstance(res, SmoothingResult)
    with pytest.raises(AttributeError):
        res.radius = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: certify_counts([1, 2], [3, 4], 0.0, 0.05), "sigma=0.0"),
        (lambda: certify_counts([1, 2], [3, 4], -1.0, 0.05), "sigma=-1.0"),
        (lambda: certify_counts([1, 2], [3, 4], math.inf, 0.05), "sigma=inf"),
        (lambda: certify_counts([1, 2], [3, 4], 1.0, 0.0), "alpha=0.0"),
        (lambda: certify_counts([1, 2], [3, 4], 1.0, 1.5), "alpha=1.5"),
        (lambda: certify_counts([1, 2], [3, -4], 1.0, 0.05), "counts=[3, -4]"),
        (lambda: certify_counts([1, -2], [3, 4], 1.0, 0.05), "pilot_counts=[1, -2]"),
        (lambda: certify_counts([1, 2, 3], [3, 4], 1.0, 0.05), "pilot_counts=[1, 2, 3]"),
        (lambda: certify_counts([], [], 1.0, 0.05), "pilot_counts=[]"),
        (lambda: certify_counts([1, 2], [0, 0], 1.0, 0.05), "counts=[0, 0]"),
        (lambda: predict_counts([], 0.05), "counts=[]"),
        (lambda: predict_counts([1, 2], 2.0), "alpha=2.0"),
        (lambda: tcertify_counts([1, 2], [3, 4], 1.0, 0.05, mode="max"), "mode='max'"),
        (lambda: tcertify_counts([1, 2], [3, 4], 1.0, 0.05, grid=()), "grid=()"),
        (lambda: tcertify_counts([1, 2], [3, 4], 1.0, 0.05, grid=(0.0, 1.0)), "value 0.0"),
        (lambda: tcertify_counts([1, 2], [3, 4], 1.0, 0.05, grid=(0.5, 1.2)), "value 1.2"),
        (lambda: tcertify_counts([1, 2], [3, 4], -2.0, 0.05), "sigma=-2.0"),
        (lambda: tcertify_counts([1], [3], 1.0, 0.05), "counts=[3]"),
    ],
)
def test_bad_input_names_the_value(call, needle):
    with pytest.raises(ValueError) as err:
        call()
    assert needle in str(err.value)


# ---------------------------------------------------------------------------------- SmoothedClassifier

class Linear(torch.nn.Module):
    """A fixed random linear classifier on 3x4x4 images: counts depend on the noise."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(48, classes)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=generator))
            self.fc.bias.zero_()
            self.fc.bias[2] = 3.0  # class 2 wins most of the time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_smoothed_classifier_certify_uses_pilot_and_main_streams():
    model = Linear().eval()
    x = torch.full((3, 4, 4), 0.5)
    smoothed = SmoothedClassifier(model, 4, 0.25, batch_size=64)
    cert = smoothed.certify(x, 50, 400, 0.01, seed=3, idx=7, mode="bonferroni")
    assert isinstance(cert, Certification)
    pilot = sample_counts(model, x, 50, 4, 0.25, batch_size=256, seed=3, idx=7, stream=PILOT_STREAM)
    main = sample_counts(model, x, 400, 4, 0.25, batch_size=256, seed=3, idx=7, stream=MAIN_STREAM)
    assert cert.pilot_counts.dtype == np.int64 and cert.counts.dtype == np.int64
    np.testing.assert_array_equal(cert.pilot_counts, pilot.numpy())
    np.testing.assert_array_equal(cert.counts, main.numpy())
    assert cert.certify == certify_counts(pilot.numpy(), main.numpy(), 0.25, 0.01)
    assert cert.tcertify == tcertify_counts(pilot.numpy(), main.numpy(), 0.25, 0.01, mode="bonferroni")
    assert cert.certify.candidate == int(np.argmax(pilot.numpy())) and cert.tcertify.mode == "bonferroni"


def test_smoothed_classifier_predict_and_checks():
    model = Linear().eval()
    x = torch.full((3, 4, 4), 0.5)
    smoothed = SmoothedClassifier(model, 4, 0.25)
    res = smoothed.predict(x, 200, 0.01, seed=1, idx=2)
    counts = sample_counts(model, x, 200, 4, 0.25, seed=1, idx=2, stream=MAIN_STREAM).numpy()
    assert res == predict_counts(counts, 0.01)
    with pytest.raises(ValueError, match="model.training=True"):
        SmoothedClassifier(Linear().train(), 4, 0.25).predict(x, 10, 0.01)
    with pytest.raises(ValueError, match="sigma=0"):
        SmoothedClassifier(model, 4, 0)
    with pytest.raises(ValueError, match="num_classes=1"):
        SmoothedClassifier(model, 1, 0.25)
    with pytest.raises(ValueError, match="mode='x'"):
        smoothed.certify(x, 10, 10, 0.01, mode="x")
    with pytest.raises(ValueError, match="n=0"):
        smoothed.certify(x, 10, 0, 0.01)
    assert DEFAULT_GRID[-1] == 1.0
