"""Certified accuracy, ACR, abstain rate and ``summarize`` on hand-computed examples."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from adre_ray.analysis.metrics import (
    ABSTAIN,
    DEFAULT_RADII,
    TABLE_RADII,
    abstain_rate,
    average_certified_radius,
    certified_accuracy,
    method_columns,
    mlflow_metric_name,
    mlflow_metrics,
    summarize,
)
from adre_ray.analysis.results import read_results, write_part

# Five images: two correct (radii 0.5, 1.0), an abstention (radius 0), a WRONG class certified at a big
# radius 2.0 (must not count), and a correct one at 0.75.
RADIUS = np.array([0.5, 1.0, 0.0, 2.0, 0.75])
CORRECT = np.array([True, True, False, False, True])


def test_certified_accuracy_hand_computed():
    radii = [0.0, 0.5, 0.75, 0.76, 1.0, 1.5, 2.0]
    # r=0: {0.5, 1.0, 0.75} -> 3/5; r=0.5: same (>=); r=0.75: {1.0, 0.75}; r=0.76: {1.0}; r=1.0: {1.0};
    # r=1.5 and r=2.0: the 2.0 image is a wrong class, so none.
    expected = np.array([3, 3, 2, 1, 1, 0, 0]) / 5
    np.testing.assert_array_equal(certified_accuracy(RADIUS, CORRECT, radii), expected)


def test_wrong_class_with_big_radius_is_not_certified():
    acc = certified_accuracy(np.array([5.0]), np.array([False]), [0.0, 1.0])
    np.testing.assert_array_equal(acc, [0.0, 0.0])


def test_certified_accuracy_float_grid_is_robust():
    # 3 * 0.1 = 0.30000000000000004 > 0.3: a radius of exactly 0.3 must still count at r = 3 * 0.1.
    acc = certified_accuracy(np.array([0.3, 0.1 * 3]), np.array([True, True]), [0.3, 0.1 * 3])
    np.testing.assert_array_equal(acc, [1.0, 1.0])
    # a radius clearly below r does not count
    assert certified_accuracy(np.array([0.299]), np.array([True]), [0.3])[0] == 0.0


def test_nan_radius_never_certified():
    acc = certified_accuracy(np.array([np.nan, 1.0]), np.array([True, True]), [0.0])
    assert acc[0] == 0.5
    assert average_certified_radius(np.array([np.nan, 1.0]), np.array([True, True])) == 0.5


def test_acr_formula():
    # sum of radii of correctly certified images / ALL images = (0.5 + 1.0 + 0.75) / 5
    assert average_certified_radius(RADIUS, CORRECT) == pytest.approx(2.25 / 5, abs=1e-15)
    assert average_certified_radius(np.zeros(3), np.zeros(3, dtype=bool)) == 0.0


def test_abstain_rate():
    assert abstain_rate(np.array([ABSTAIN, 3, ABSTAIN, 0])) == 0.5
    assert abstain_rate(np.array([1, 2])) == 0.0


def test_default_radii_grids():
    assert DEFAULT_RADII == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    assert len(TABLE_RADII) == 13 and TABLE_RADII[0] == 0.0 and TABLE_RADII[-1] == 3.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: certified_accuracy(np.array([]), np.array([], dtype=bool), [0.0]), "empty"),
        (lambda: certified_accuracy(np.ones(2), np.ones(3, dtype=bool), [0.0]), "must match"),
        (lambda: certified_accuracy(np.ones(2), np.ones(2, dtype=bool), [-0.5]), r"radii=\[-0.5\]"),
        (lambda: certified_accuracy(np.ones(2), np.ones(2, dtype=bool), []), "radii"),
        (lambda: average_certified_radius(np.array([]), np.array([], dtype=bool)), "empty"),
        (lambda: abstain_rate(np.array([])), "predict"),
        (lambda: summarize({"radius_certify": []}), "empty"),
        (lambda: summarize([1, 2, 3]), "table"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _row(idx: int, label: int, cls: int, radius: float, t_cls: int, t_radius: float) -> dict:
    counts = [0] * 10
    counts[max(cls, 0)] = 100
    return {
        "idx": idx, "label": label, "predict": cls, "correct": cls == label,
        "correct_tcertify": t_cls == label,
        "certify_predict": cls, "tcertify_predict": t_cls, "radius_certify": radius,
        "radius_tcertify": t_radius, "tcertify_mode": "paper", "pA_lower": 0.9, "pB_upper": 0.05,
        "alpha_prime": 0.001, "pA_lower_certify": 0.9, "counts": counts, "pilot_counts": counts, "n0": 100,
        "n": 100, "alpha": 0.001, "sigma": 0.25, "seed": 0, "time_s": 0.1, "checkpoint": "ckpt.pt",
        "train_run_id": "",
    }


@pytest.fixture()
def result_table(tmp_path) -> pa.Table:
    rows = [
        _row(0, 1, 1, 0.5, 1, 0.6),
        _row(1, 2, 2, 1.0, 2, 1.25),
        _row(2, 3, ABSTAIN, 0.0, ABSTAIN, 0.0),
        _row(3, 4, 5, 2.0, 5, 2.5),  # wrong class, big radius
    ]
    write_part(tmp_path / "res", rows)
    return read_results(tmp_path / "res")


def test_summarize_keys_and_values(result_table):
    summary = summarize(result_table)
    expected_keys = {f"{m}/cert_acc@{r:.2f}" for m in ("certify", "tcertify") for r in DEFAULT_RADII}
    expected_keys |= {f"{m}/{k}" for m in ("certify", "tcertify")
                      for k in ("acr", "abstain_rate", "num_images")}
    expected_keys |= {"predict/abstain_rate", "predict/accuracy", "samples/per_image"}
    assert set(summary) == expected_keys
    assert summary["certify/cert_acc@0.00"] == 0.5
    assert summary["certify/cert_acc@0.50"] == 0.5      # 0.5 >= 0.5 and 1.0
    assert summary["certify/cert_acc@0.75"] == 0.25     # only 1.0
    assert summary["certify/cert_acc@1.25"] == 0.0      # the 2.0 one is the wrong class
    assert summary["tcertify/cert_acc@1.25"] == 0.25    # T-CERTIFY radius 1.25
    assert summary["certify/acr"] == pytest.approx(1.5 / 4)
    assert summary["tcertify/acr"] == pytest.approx(1.85 / 4)
    assert summary["certify/abstain_rate"] == 0.25
    assert summary["certify/num_images"] == 4
    assert summary["predict/accuracy"] == 0.5
    # a mapping of columns gives the same numbers as the pyarrow table
    assert summarize(result_table.to_pydict()) == summary


def test_summarize_old_files_without_tcertify_columns(result_table):
    # schema v1 (ARCHITECTURE.md list): no correct_tcertify / *_predict; T-CERTIFY is correct where
    # CERTIFY is and its radius > 0, and abstains where its radius is 0.
    old = result_table.drop_columns(["correct_tcertify", "certify_predict", "tcertify_predict"])
    radius, correct, predict = method_columns(old, "tcertify")
    np.testing.assert_array_equal(correct, [True, True, False, False])
    np.testing.assert_array_equal(predict < 0, [False, False, True, False])
    assert summarize(old)["tcertify/acr"] == pytest.approx(1.85 / 4)


def test_mlflow_metric_names_are_legal(result_table):
    # MLflow's rule (mlflow.utils.validation): alphanumerics, _ - . / space colon only.
    legal = re.compile(r"^[/\w.\- :]*$")
    assert mlflow_metric_name("certify/cert_acc@0.50") == "certify/cert_acc_at_0.50"
    names = mlflow_metrics(summarize(result_table), prefix="run A/")
    assert all(legal.match(name) for name in names)
    assert names["run A/certify/cert_acc_at_0.50"] == 0.5
