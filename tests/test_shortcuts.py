"""Evaluation shortcuts and the max-count runner-up bound on counts (no Ray, no model).

- the max-count bound is never looser than eq. 14 and ``paper`` mode ignores it (its coverage is in
  tests/test_coverage.py);
- early abstain: certain stops (delta = 0) never change an outcome, and in a seeded simulation the rate at
  which a stop changes the outcome stays below delta + 3 sqrt(delta (1 - delta) / trials);
- ISS: the chosen n is a function of the pilot counts only (main draws never change it);
- summaries count shortcut rows as not certified-correct; older rows read with defaults.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adre_ray.analysis.metrics import summarize
from adre_ray.analysis.results import ensure_manifest, read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.distributed.certify import ImageInFlight, next_wave, result_row, shortcut_rules
from adre_ray.smoothing import pA_lower, pB_upper, pB_upper_max, tcertify_counts
from adre_ray.smoothing.shortcuts import (
    allowed_sample_sizes,
    certify_threshold,
    iss_sample_size,
    should_stop_early,
    wave_level,
)


def test_max_bound_is_never_looser_than_eq14():
    rng = np.random.default_rng(0)
    for _ in range(500):
        classes = int(rng.choice([2, 3, 10, 100]))
        counts = rng.multinomial(int(rng.integers(1, 3000)), rng.dirichlet(np.ones(classes)))
        n, beta = int(counts.sum()), float(rng.uniform(1e-4, 0.5))
        assert pB_upper_max(counts[1:], n, beta) <= pB_upper(counts[1:], n, beta) * (1 + 1e-12)
    assert pB_upper_max([], 10, 0.1) == 0.0 and pB_upper_max([3], 10, 0.0) == 1.0
    with pytest.raises(ValueError, match="pb_bound='both'"):
        tcertify_counts([5, 90, 5], [10, 980, 10], 0.5, 0.01, pb_bound="both")


def test_paper_mode_keeps_eq14_and_max_is_at_least_as_tight():
    pilot, counts = np.array([5, 80, 10, 5]), np.array([500, 8000, 1000, 500])
    paper = tcertify_counts(pilot, counts, 0.5, 0.001, mode="paper", pb_bound="max")
    assert paper.pb_bound == "sum" and paper == tcertify_counts(pilot, counts, 0.5, 0.001, mode="paper")
    for mode in ("pilot", "bonferroni"):
        tight = tcertify_counts(pilot, counts, 0.5, 0.001, mode=mode, pb_bound="max")
        assert tight.pb_bound == "max"
        assert tight.radius >= tcertify_counts(pilot, counts, 0.5, 0.001, mode=mode).radius - 1e-12


def test_certify_threshold_is_the_smallest_certifying_count():
    for n, alpha in ((2_000, 0.001), (100_000, 0.001), (50, 0.1)):
        k = certify_threshold(n, alpha)
        assert pA_lower(k, n, alpha) >= 0.5 > pA_lower(k - 1, n, alpha)
    assert certify_threshold(5, 0.001) == 6  # pA_lower(5, 5) = 0.001^(1/5) < 1/2: nothing certifies


def test_certain_stop_never_changes_the_outcome():
    n, k = 2_000, certify_threshold(2_000, 0.001)
    for m in range(200, n, 200):
        for n_a in range(0, m + 1, 7):
            if should_stop_early(n_a, m, n, k, 0.0):
                assert n_a + (n - m) < k  # even all remaining draws cA leave N_A < K: abstains anyway


@pytest.mark.parametrize("p_a", [0.48, 0.5, 0.505, 0.51, 0.52])
def test_early_abstain_outcome_change_rate_is_below_its_bound(p_a):
    """Per image P(stop and the full run certifies) <= delta (docs/certification.md); p_A near the
    certification threshold K / n is the worst case. Only N_A matters, so shards are Bin(shard, p_A)."""
    n, shard, delta, trials, alpha = 20_000, 2_000, 0.05, 4_000, 0.001
    k = certify_threshold(n, alpha)
    shards = n // shard
    level = wave_level(delta, shards - 1)
    rng = np.random.default_rng(int(p_a * 1e4))
    draws = rng.binomial(shard, p_a, size=(trials, shards)).cumsum(axis=1)
    changed = 0
    for row in draws:
        certifies = row[-1] >= k
        stopped = any(should_stop_early(int(row[w]), (w + 1) * shard, n, k, level) for w in range(shards - 1))
        changed += stopped and certifies
    assert changed / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)


def test_iss_choice_depends_on_the_pilot_only():
    cfg = CertifyConfig(checkpoint="x", sigma=0.5, n=10_000, shard_size=1_000, n_policy="iss")
    rng = np.random.default_rng(3)
    for _ in range(20):
        pilot = rng.multinomial(100, rng.dirichlet(np.full(10, 0.3)))
        chosen = set()
        for _ in range(5):  # the same pilot with different main draws already summed
            image = ImageInFlight(0, pilot.copy(), rng.multinomial(10_000, np.full(10, 0.1)), n=cfg.n)
            next_wave(image, shortcut_rules(cfg), cfg.shard_size)
            chosen.add(image.n)
        assert len(chosen) == 1
        n = chosen.pop()
        assert n == iss_sample_size(pilot, 10_000, 1_000, 0.5, 0.001, 0.05) and n in allowed_sample_sizes(
            10_000, 1_000)
    assert iss_sample_size(np.array([0, 100]), 10_000, 1_000, 0.5, 0.001, 0.0) == 10_000
    with pytest.raises(ValueError, match="max_radius_loss=-1"):
        iss_sample_size(np.array([0, 100]), 10_000, 1_000, 0.5, 0.001, -1)


def _row(idx: int, label: int, pilot, counts, shortcut: str = "none") -> dict:
    return result_row(idx, label, np.array(pilot), np.array(counts), sigma=0.5, alpha=0.001, mode="pilot",
                      grid=(0.5, 1.0), seed=0, time_s=0.0, checkpoint="c", train_run_id=None,
                      pb_bound="max", shortcut=shortcut)


def test_shortcut_rows_are_never_certified_correct():
    full = _row(0, 1, [0, 100], [0, 1000])
    skipped = _row(1, 0, [0, 100], [0, 0], "skipped_misclassified")
    early = _row(2, 1, [10, 90], [300, 200], "early_abstain")
    assert full["correct"] and full["samples_used"] == 1100 and full["shortcut"] == "none"
    assert skipped["certify_predict"] == skipped["tcertify_predict"] == -1 and skipped["n"] == 0
    assert skipped["samples_used"] == 100 and early["samples_used"] == 600 and early["radius_tcertify"] == 0
    tampered = dict(early, correct=True, correct_tcertify=True, radius_certify=1.0)  # a stale column
    summary = summarize(pa.Table.from_pylist([full, skipped, tampered]))
    assert summary["certify/cert_acc@0.00"] == summary["tcertify/cert_acc@0.00"] == pytest.approx(1 / 3)
    assert summary["samples/per_image"] == pytest.approx((1100 + 100 + 600) / 3)
    assert summary["shortcut/early_abstain_rate"] == pytest.approx(1 / 3)


def test_version_2_rows_and_manifests_still_read(tmp_path):
    row = _row(0, 1, [0, 100], [0, 1000])
    old = {k: v for k, v in row.items() if k not in ("samples_used", "shortcut", "pb_bound", "certify_level",
                                                      "target_radius", "decision")}
    pq.write_table(pa.Table.from_pylist([old]), tmp_path / "part-000000000-x.parquet")
    back = read_results(tmp_path).to_pylist()[0]
    assert back["samples_used"] == 1100 and back["shortcut"] == "none" and back["pb_bound"] == "sum"
    assert back["certify_level"] == 0.001 and back["target_radius"] is None and back["decision"] is None
    settings = dict(checkpoint="c", dataset="cifar10", split="test", sigma=0.5, n0=100, n=1000, alpha=0.001,
                    seed=0, mode="pilot", grid=[1.0], shard_size=500)
    (tmp_path / "run.json").write_text(__import__("json").dumps(settings))  # a version 2 manifest
    defaults = dict(pb_bound="sum", skip_misclassified=False, early_abstain=False, early_abstain_delta=1e-4,
                    early_abstain_wave=1, n_policy="fixed", iss_max_radius_loss=0.05)
    assert ensure_manifest(tmp_path, {**settings, **defaults}) is True
    with pytest.raises(ValueError, match="skip_misclassified=True differs"):
        ensure_manifest(tmp_path, {**settings, **defaults, "skip_misclassified": True})


def test_shortcut_simulation_runs_and_skip_keeps_the_table(monkeypatch, capsys):
    """benchmarks/shortcut_simulation.py end to end in a tiny setting: skip and skip+early keep the table."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = importlib.import_module("shortcut_simulation")
    assert module.main(["--source", "synthetic", "--images", "30", "--n", "20000", "--shard-size", "2000",
                        "--sigmas", "0.5"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "x |" in line}
    for variant in ("skip", "early", "skip+early"):
        assert "| yes |" in rows[variant], rows[variant]
