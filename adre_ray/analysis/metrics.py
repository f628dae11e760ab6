"""Certified-accuracy metrics on certification results (numpy only, no Ray, no MLflow).

For N certified images with certified radius R_i and flag C_i = "certified class == label and not
abstained" (an abstention has C_i = False):

- certified accuracy at r:  CA(r) = (1 / N) * #{i : C_i and R_i >= r}   (the paper's Table 1 / Figure 1);
- average certified radius: ACR  = (1 / N) * sum_i R_i * C_i            (0 for every image not correctly
  certified, divided by the count of ALL images);
- abstain rate:             #{i : prediction == ABSTAIN} / N.

``summarize`` computes these for CERTIFY and T-CERTIFY from one result table (see
``adre_ray.analysis.results`` for the columns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adre_ray.config.certify import ABSTAINING_SHORTCUTS

ABSTAIN = -1
"""Class index that PREDICT / CERTIFY / T-CERTIFY write for an abstention (Cohen et al.'s convention)."""

DEFAULT_RADII: tuple[float, ...] = tuple(round(0.25 * i, 2) for i in range(9))
"""0, 0.25, ..., 2.0: the radii ``summarize`` reports."""

TABLE_RADII: tuple[float, ...] = tuple(round(0.25 * i, 2) for i in range(13))
"""0, 0.25, ..., 3.0: the columns of the paper-style certified-accuracy table."""

RADIUS_TOL = 1e-9
"""Absolute slack in ``radius >= r``: grid values such as 3 * 0.1 carry rounding error of ~1e-16, and a
radius that equals a grid point up to float noise must count at that radius."""

METHODS: tuple[str, ...] = ("certify", "tcertify")
"""Certification methods in a result table; each has a radius and a correctness column."""

_RADIUS_COLUMN = {"certify": "radius_certify", "tcertify": "radius_tcertify"}
_CORRECT_COLUMN = {"certify": "correct", "tcertify": "correct_tcertify"}
_PREDICT_COLUMN = {"certify": "certify_predict", "tcertify": "tcertify_predict"}


def _as_1d(name: str, values: Any, dtype: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def check_radii(radii: Sequence[float]) -> np.ndarray:
    """``radii`` as a float array; ValueError unless a non-empty sequence of finite numbers >= 0."""
    arr = np.asarray(list(radii), dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"radii={list(radii)!r}: must be a non-empty sequence of numbers")
    bad = arr[~np.isfinite(arr) | (arr < 0)]
    if bad.size:
        raise ValueError(f"radii={list(radii)!r}: {bad[0]!r} is not a finite number >= 0")
    return arr


def _check_radius_correct(radius: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    radius_arr = _as_1d("radius", radius, float)
    correct_arr = _as_1d("correct", correct, bool)
    if radius_arr.shape != correct_arr.shape:
        raise ValueError(
            f"radius has {radius_arr.size} entries but correct has {correct_arr.size}: must match"
        )
    if radius_arr.size == 0:
        raise ValueError("radius: no images (empty input)")
    return radius_arr, correct_arr


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """CA(r) = #{i : correct_i and radius_i >= r} / N for each r in ``radii`` (N = all images).

    A NaN radius never counts as certified. Returns a float array shaped like ``radii``.
    """
    radius_arr, correct_arr = _check_radius_correct(radius, correct)
    grid = check_radii(radii)
    certified = correct_arr[:, None] & (radius_arr[:, None] >= grid[None, :] - RADIUS_TOL)
    return certified.sum(axis=0) / radius_arr.size


def average_certified_radius(radius: np.ndarray, correct: np.ndarray) -> float:
    """ACR = sum_i radius_i * correct_i / N (radius counts only where correctly certified)."""
    radius_arr, correct_arr = _check_radius_correct(radius, correct)
    contributions = np.where(correct_arr & np.isfinite(radius_arr), radius_arr, 0.0)
    return float(contributions.sum() / radius_arr.size)


def abstain_rate(predict: np.ndarray) -> float:
    """Fraction of images whose prediction is ``ABSTAIN`` (any negative class index)."""
    predict_arr = _as_1d("predict", predict, np.int64)
    if predict_arr.size == 0:
        raise ValueError("predict: no images (empty input)")
    return float(np.mean(predict_arr < 0))


def radius_key(method: str, r: float) -> str:
    """The ``summarize`` key of certified accuracy at ``r``, e.g. ``certify/cert_acc@0.50``."""
    return f"{method}/cert_acc@{r:.2f}"


def _column(table: Any, name: str) -> np.ndarray | None:
    """Column ``name`` of a pyarrow Table or a mapping of columns (nulls as None); None if absent."""
    names = table.column_names if hasattr(table, "column_names") else list(table.keys())
    if name not in names:
        return None
    col = table.column(name) if hasattr(table, "column_names") else table[name]
    if hasattr(col, "to_pylist"):  # pyarrow Array / ChunkedArray: nulls would break to_numpy
        values = col.to_pylist()
        return np.asarray(values, dtype=object) if values and None in values else np.asarray(values)
    return np.asarray(col)


def _num_rows(table: Any) -> int:
    if hasattr(table, "num_rows"):
        return int(table.num_rows)
    lengths = {len(np.asarray(v)) for v in table.values()}
    if len(lengths) > 1:
        raise ValueError(f"table: columns have different lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _floats(values: np.ndarray) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _nullable(values: np.ndarray | None, n: int) -> tuple[list[Any], np.ndarray]:
    """(values as a list, mask of nulls); an absent column is all null."""
    if values is None:
        return [None] * n, np.ones(n, dtype=bool)
    listed = list(values)
    return listed, np.array([v is None for v in listed], dtype=bool)


def method_columns(table: Any, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(radius, correct, predict) of ``method`` in ``table``; predict is ``ABSTAIN`` on abstentions.

    Rows from older versions may lack ``correct_tcertify`` / ``*_predict`` (absent or null). Then
    T-CERTIFY counts as correct where CERTIFY is and its radius is > 0 (both certify the pilot class cA,
    and T-CERTIFY abstains exactly when its radius is 0), and a method abstained where its radius is not
    > 0 (the class of a non-abstention is then unknown and reported as 0). A null radius is NaN, which
    never counts as certified.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    radius_col = _column(table, _RADIUS_COLUMN[method])
    if radius_col is None:
        raise ValueError(f"table: missing column {_RADIUS_COLUMN[method]!r} needed for method={method!r}")
    radius = _floats(radius_col)
    n = radius.size
    certified = radius > 0  # NaN > 0 is False
    correct_list, correct_null = _nullable(_column(table, _CORRECT_COLUMN[method]), n)
    if correct_null.any():
        if method == "certify":
            fallback = np.zeros(n, dtype=bool)
        else:
            base, _ = _nullable(_column(table, "correct"), n)
            fallback = np.array([bool(v) if v is not None else False for v in base]) & certified
        correct_list = [fallback[i] if correct_null[i] else correct_list[i] for i in range(n)]
    correct = np.array([bool(v) for v in correct_list], dtype=bool)
    shortcut_list, _ = _nullable(_column(table, "shortcut"), n)
    abstained_by_shortcut = np.array([v in ABSTAINING_SHORTCUTS for v in shortcut_list], dtype=bool)
    correct &= ~abstained_by_shortcut  # a skipped / early-abstained row is never certified-correct
    predict_list, predict_null = _nullable(_column(table, _PREDICT_COLUMN[method]), n)
    predict = np.array([(0 if certified[i] else ABSTAIN) if predict_null[i] else int(predict_list[i])
                        for i in range(n)], dtype=np.int64)
    return radius, correct, predict


def methods_present(table: Any) -> tuple[str, ...]:
    """The methods of ``METHODS`` whose radius column is in ``table`` with at least one non-null value.

    A published CERTIFY log (``adre_ray.analysis.published_logs``) has CERTIFY radii only: its
    T-CERTIFY is absent, not zero, and is left out of summaries, tables and plots.
    """
    present = []
    for method in METHODS:
        values = _column(table, _RADIUS_COLUMN[method])
        if values is not None and any(v is not None for v in values):
            present.append(method)
    return tuple(present)


def summarize(table: Any, radii: Sequence[float] = DEFAULT_RADII) -> dict[str, float]:
    """Certified accuracy at each of ``radii``, ACR, abstain rate and image count per method.

    Keys: ``{method}/cert_acc@{r:.2f}`` (fraction in [0, 1]), ``{method}/acr``, ``{method}/abstain_rate``,
    ``{method}/num_images`` for each method in ``methods_present(table)`` (a published CERTIFY log has
    no T-CERTIFY keys), plus ``predict/abstain_rate`` and
    ``predict/accuracy`` (PREDICT's class == label) over the rows whose ``predict`` is not null, and the
    sample cost: ``samples/per_image`` (mean pilot + main draws made; n0 + n where ``samples_used`` is
    null) and ``shortcut/<name>_rate`` (fraction of rows per shortcut taken). Rows whose shortcut is
    ``skipped_misclassified`` or ``early_abstain`` count as abstentions, never as certified-correct.
    ``table`` is a pyarrow Table or a mapping of column name -> 1-D values. ValueError if empty.
    MLflow rejects '@' in metric names: log the result with ``mlflow_metrics(summary)``.
    """
    if not isinstance(table, Mapping) and not hasattr(table, "column_names"):
        raise ValueError(f"table={type(table).__name__}: must be a pyarrow Table or a mapping of columns")
    num_images = _num_rows(table)
    if num_images == 0:
        raise ValueError("table: no images (empty input)")
    grid = check_radii(radii)
    summary: dict[str, float] = {}
    for method in methods_present(table) or METHODS:  # none present: method_columns names the column
        radius, correct, predict = method_columns(table, method)
        for r, acc in zip(grid, certified_accuracy(radius, correct, grid), strict=True):
            summary[radius_key(method, float(r))] = float(acc)
        summary[f"{method}/acr"] = average_certified_radius(radius, correct)
        summary[f"{method}/abstain_rate"] = abstain_rate(predict)
        summary[f"{method}/num_images"] = float(num_images)
    predict_list, predict_null = _nullable(_column(table, "predict"), num_images)
    label_list, label_null = _nullable(_column(table, "label"), num_images)
    if not predict_null.all():
        known = ~predict_null
        predict = np.array([int(v) for v, k in zip(predict_list, known, strict=True) if k], dtype=np.int64)
        summary["predict/abstain_rate"] = abstain_rate(predict)
        if not label_null[known].any():
            labels = np.array([int(v) for v, k in zip(label_list, known, strict=True) if k], dtype=np.int64)
            summary["predict/accuracy"] = float(np.mean(predict == labels))
    summary.update(sample_summary(table, num_images))
    return summary


def sample_summary(table: Any, num_images: int) -> dict[str, float]:
    """``samples/per_image`` (mean draws per image) and ``shortcut/<name>_rate`` per shortcut taken."""
    out: dict[str, float] = {}
    used, used_null = _nullable(_column(table, "samples_used"), num_images)
    n0, _ = _nullable(_column(table, "n0"), num_images)
    n, _ = _nullable(_column(table, "n"), num_images)
    samples = []
    for i in range(num_images):
        if not used_null[i]:
            samples.append(float(used[i]))
        elif n0[i] is not None and n[i] is not None:
            samples.append(float(n0[i]) + float(n[i]))
    if samples:
        out["samples/per_image"] = float(np.mean(samples))
    shortcuts, _ = _nullable(_column(table, "shortcut"), num_images)
    for name in sorted({v for v in shortcuts if v not in (None, "none")}):
        out[f"shortcut/{name}_rate"] = float(np.mean([v == name for v in shortcuts]))
    out.update(target_summary(table, num_images))
    return out


def target_summary(table: Any, num_images: int) -> dict[str, float]:
    """For ``--target-radius`` rows: ``target/radius`` and ``target/certified_fraction`` (decision
    ``certified`` and CERTIFY's class == label, over all images), ``target/<decision>_rate``."""
    decisions, _ = _nullable(_column(table, "decision"), num_images)
    radii, _ = _nullable(_column(table, "target_radius"), num_images)
    known = {float(r) for r in radii if r is not None}
    if not known:
        return {}
    correct, _ = _nullable(_column(table, "correct"), num_images)
    out = {"target/radius": max(known), "target/certified_fraction": float(np.mean(
        [d == "certified" and bool(c) for d, c in zip(decisions, correct, strict=True)]))}
    for name in ("certified", "not_certified", "abstain"):
        out[f"target/{name}_rate"] = float(np.mean([d == name for d in decisions]))
    return out



def mlflow_metric_name(key: str) -> str:
    """``key`` made legal as an MLflow metric name ('@' is not): ``certify/cert_acc@0.50`` ->
    ``certify/cert_acc_at_0.50``. Log ``summarize`` output with ``mlflow_metrics``, not directly."""
    return key.replace("@", "_at_")


def mlflow_metrics(summary: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """``summary`` with every key passed through ``mlflow_metric_name`` (and ``prefix`` prepended)."""
    return {prefix + mlflow_metric_name(key): float(value) for key, value in summary.items()}
