"""Properties of the bounds and radii for arbitrary valid counts (hypothesis, derandomized)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from adre_ray.smoothing import certify_counts, pA_lower, pB_upper, tcertify_counts

PROPERTY = settings(derandomize=True, max_examples=150, deadline=None)

# alpha, beta <= 1/2 in the first two properties: the CP lower bound sits below the Beta median, which is
# <= N_A/n because P(Bin(n, N_A/n) >= N_A) >= 1/2 (the binomial median equals an integer mean); likewise
# S(max_j N_j / n) >= P(Bin(n, N_max/n) <= N_max) >= 1/2 >= beta, so the eq. 14 infimum is >= N_max / n.
levels = st.floats(min_value=1e-6, max_value=0.5)


@st.composite
def count_and_total(draw) -> tuple[int, int]:
    n = draw(st.integers(min_value=1, max_value=100_000))
    return draw(st.integers(min_value=0, max_value=n)), n


@st.composite
def other_counts_and_total(draw) -> tuple[list[int], int]:
    counts = draw(st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=30))
    extra = draw(st.integers(min_value=0, max_value=5000))  # the top class's count
    return counts, sum(counts) + extra if sum(counts) + extra > 0 else 1


@PROPERTY
@given(count_and_total(), levels)
def test_pA_lower_between_zero_and_frequency(nA_n, alpha):
    nA, n = nA_n
    assert 0.0 <= pA_lower(nA, n, alpha) <= nA / n


@PROPERTY
@given(other_counts_and_total(), levels)
def test_pB_upper_at_least_the_largest_frequency(others_n, beta):
    others, n = others_n
    bound = pB_upper(others, n, beta)
    assert max(others) / n <= bound <= 1.0


@st.composite
def certify_case(draw) -> tuple[np.ndarray, np.ndarray, int]:
    """Main counts with a donor class j != cA = 0 holding at least one count; the pilot picks class 0."""
    classes = draw(st.integers(min_value=2, max_value=12))
    counts = np.array(draw(st.lists(st.integers(0, 400), min_size=classes, max_size=classes)))
    donor = draw(st.integers(min_value=1, max_value=classes - 1))
    counts[donor] += 1
    counts[0] += draw(st.integers(0, 3000))
    pilot = np.zeros(classes, dtype=np.int64)
    pilot[0] = 1
    return pilot, counts, donor


@PROPERTY
@given(certify_case(), st.floats(min_value=1e-4, max_value=0.2))
def test_radius_non_decreasing_when_a_count_moves_to_the_top_class(case, alpha):
    pilot, counts, donor = case
    moved = counts.copy()
    moved[donor] -= 1
    moved[0] += 1
    for radius in (lambda c: certify_counts(pilot, c, 0.5, alpha).radius,
                   lambda c: tcertify_counts(pilot, c, 0.5, alpha, mode="paper").radius):
        assert radius(moved) >= radius(counts)
