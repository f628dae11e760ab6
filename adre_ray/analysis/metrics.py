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
import pyarrow as pa
import pyarrow.compute as pc

from adre_ray.smoothing.shortcuts import ABSTAINING_SHORTCUTS

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

    A NaN radius never counts as certified. Returns a float array shaped like ``radii``. Memory O(N),
    time O((N + len(radii)) log N): the correctly certified radii are sorted once and counted by
    binary search (``radius >= r - RADIUS_TOL``), never as an N x len(radii) matrix.
    """
    radius_arr, correct_arr = _check_radius_correct(radius, correct)
    grid = check_radii(radii)
    certified = np.sort(radius_arr[correct_arr & ~np.isnan(radius_arr)])
    below = np.searchsorted(certified, grid - RADIUS_TOL, side="left")
    return (certified.size - below) / radius_arr.size


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


_ARROW_TYPES = {float: pa.float64(), np.int64: pa.int64(), bool: pa.bool_()}


def _names(table: Any) -> list[str]:
    return table.column_names if hasattr(table, "column_names") else list(table.keys())


def _values(table: Any, name: str, dtype: Any, fill: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(column ``name`` as a ``dtype`` array with nulls replaced by ``fill``, mask of the nulls), or None
    when the column is absent. ``table``: a pyarrow Table (converted column-wise, no Python object per
    row) or a mapping of column name -> 1-D values (None for null)."""
    if name not in _names(table):
        return None
    col = table.column(name) if hasattr(table, "column_names") else table[name]
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        typed = col.cast(_ARROW_TYPES[dtype])
        nulls = np.asarray(typed.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        filled = pc.fill_null(typed, pa.scalar(fill, _ARROW_TYPES[dtype]))
        return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=dtype), nulls
    listed = list(np.asarray(col, dtype=object)) if not isinstance(col, list) else col
    nulls = np.array([v is None for v in listed], dtype=bool)
    return np.array([fill if v is None else v for v in listed], dtype=dtype).reshape(-1), nulls


def _absent(n: int, dtype: Any, fill: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, fill, dtype=dtype), np.ones(n, dtype=bool)


def _string_counts(table: Any, name: str) -> dict[str, int]:
    """How many rows hold each non-null value of string column ``name`` ({} when absent)."""
    if name not in _names(table):
        return {}
    col = table.column(name) if hasattr(table, "column_names") else table[name]
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        counts = pc.value_counts(col.cast(pa.string()))
        return {str(v): int(c) for v, c in zip(counts.field("values").to_pylist(),
                                                 counts.field("counts").to_pylist(), strict=True)
                if v is not None}
    values = [v for v in col if v is not None]
    return {str(v): values.count(v) for v in set(values)}


def _is_in(table: Any, name: str, wanted: Sequence[str], n: int) -> np.ndarray:
    """Mask of the rows whose string column ``name`` is one of ``wanted`` (all False when absent)."""
    if name not in _names(table):
        return np.zeros(n, dtype=bool)
    col = table.column(name) if hasattr(table, "column_names") else table[name]
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        found = pc.is_in(col.cast(pa.string()), value_set=pa.array(list(wanted), pa.string()))
        return np.asarray(pc.fill_null(found, False).to_numpy(zero_copy_only=False), dtype=bool)
    return np.array([v in wanted for v in col], dtype=bool)


def _num_rows(table: Any) -> int:
    if hasattr(table, "num_rows"):
        return int(table.num_rows)
    lengths = {len(np.asarray(v)) for v in table.values()}
    if len(lengths) > 1:
        raise ValueError(f"table: columns have different lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 0


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
    radius_col = _values(table, _RADIUS_COLUMN[method], float, np.nan)
    if radius_col is None:
        raise ValueError(f"table: missing column {_RADIUS_COLUMN[method]!r} needed for method={method!r}")
    radius = radius_col[0]
    n = radius.size
    certified = radius > 0  # NaN > 0 is False
    correct, correct_null = _values(table, _CORRECT_COLUMN[method], bool, False) or _absent(n, bool, False)
    if correct_null.any():
        if method == "certify":
            fallback = np.zeros(n, dtype=bool)
        else:
            base, _ = _values(table, "correct", bool, False) or _absent(n, bool, False)
            fallback = base & certified
        correct = np.where(correct_null, fallback, correct)
    correct &= ~_is_in(table, "shortcut", tuple(ABSTAINING_SHORTCUTS), n)  # skipped / early-abstained rows
    given, predict_null = _values(table, _PREDICT_COLUMN[method], np.int64, 0) or _absent(n, np.int64, 0)
    predict = np.where(predict_null, np.where(certified, 0, ABSTAIN), given).astype(np.int64)
    return radius, correct, predict


def methods_present(table: Any) -> tuple[str, ...]:
    """The methods of ``METHODS`` whose radius column is in ``table`` with at least one non-null value.

    A published CERTIFY log (``adre_ray.analysis.published_logs``) has CERTIFY radii only: its
    T-CERTIFY is absent, not zero, and is left out of summaries, tables and plots.
    """
    present = []
    for method in METHODS:
        values = _values(table, _RADIUS_COLUMN[method], float, np.nan)
        if values is not None and not values[1].all():
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
    predict, predict_null = _values(table, "predict", np.int64, 0) or _absent(num_images, np.int64, 0)
    labels, label_null = _values(table, "label", np.int64, 0) or _absent(num_images, np.int64, 0)
    if not predict_null.all():
        known = ~predict_null
        summary["predict/abstain_rate"] = abstain_rate(predict[known])
        if not label_null[known].any():
            summary["predict/accuracy"] = float(np.mean(predict[known] == labels[known]))
    summary.update(sample_summary(table, num_images))
    return summary


def sample_summary(table: Any, num_images: int) -> dict[str, float]:
    """``samples/per_image`` (mean draws per image) and ``shortcut/<name>_rate`` per shortcut taken."""
    out: dict[str, float] = {}
    used, used_null = _values(table, "samples_used", float, 0.0) or _absent(num_images, float, 0.0)
    n0, n0_null = _values(table, "n0", float, 0.0) or _absent(num_images, float, 0.0)
    n, n_null = _values(table, "n", float, 0.0) or _absent(num_images, float, 0.0)
    known = ~used_null | (~n0_null & ~n_null)
    if known.any():
        out["samples/per_image"] = float(np.mean(np.where(used_null, n0 + n, used)[known]))
    for name, count in sorted(_string_counts(table, "shortcut").items()):
        if name != "none":
            out[f"shortcut/{name}_rate"] = count / num_images
    out.update(target_summary(table, num_images))
    return out


def target_summary(table: Any, num_images: int) -> dict[str, float]:
    """For ``--target-radius`` rows: ``target/radius`` and ``target/certified_fraction`` (decision
    ``certified`` and CERTIFY's class == label, over all images), ``target/<decision>_rate``."""
    radii = _values(table, "target_radius", float, np.nan)
    if radii is None or radii[1].all():
        return {}
    certified = _is_in(table, "decision", ["certified"], num_images)
    correct, _ = _values(table, "correct", bool, False) or _absent(num_images, bool, False)
    out = {"target/radius": float(np.max(radii[0][~radii[1]])),
           "target/certified_fraction": float(np.mean(certified & correct))}
    for name in ("certified", "not_certified", "abstain"):
        out[f"target/{name}_rate"] = float(np.mean(_is_in(table, "decision", [name], num_images)))
    return out


def mlflow_metric_name(key: str) -> str:
    """``key`` made legal as an MLflow metric name ('@' is not): ``certify/cert_acc@0.50`` ->
    ``certify/cert_acc_at_0.50``. Log ``summarize`` output with ``mlflow_metrics``, not directly."""
    return key.replace("@", "_at_")


def mlflow_metrics(summary: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """``summary`` with every key passed through ``mlflow_metric_name`` (and ``prefix`` prepended)."""
    return {prefix + mlflow_metric_name(key): float(value) for key, value in summary.items()}
