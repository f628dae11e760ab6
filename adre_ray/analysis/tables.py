"""Certified-accuracy tables in the layout of the seed paper's Table 1 (Markdown and CSV).

One row per (run, method): certified accuracy CA(r) in percent with one decimal at each radius r, the
average certified radius ACR = sum_i R_i * C_i / N, and the abstain rate in percent (see ``metrics``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from adre_ray.analysis.metrics import (
    METHODS,
    TABLE_RADII,
    abstain_rate,
    average_certified_radius,
    certified_accuracy,
    check_radii,
    method_columns,
    methods_present,
    sample_summary,
    target_summary,
)

METHOD_NAMES: dict[str, str] = {"certify": "CERTIFY", "tcertify": "T-CERTIFY"}
"""Display name of each method, as in the paper."""

METHOD_CHOICES: tuple[str, ...] = (*METHODS, "both")
"""Values of the ``method`` argument: one method, or one row per method ("both")."""

ID_COLUMNS: tuple[str, ...] = ("run", "method", "sigma", "n", "images")
"""Leading columns of every row; then one column per radius (``radius_column``), ``ACR``, ``abstain %``."""


SAMPLES_COLUMN = "samples / image"
"""Last column: mean Monte Carlo draws per image (``metrics.sample_summary``)."""

TARGET_COLUMN = "certified at target %"
"""With ``--target-radius`` runs: ``<percent certified-correct> @ r`` (``metrics.target_summary``)."""


def radius_column(r: float) -> str:
    """Column name of certified accuracy at radius ``r``: the radius with two decimals, e.g. ``0.50``."""
    return f"{r:.2f}"


def selected_methods(method: str) -> tuple[str, ...]:
    """The methods ``method`` selects: itself, or every method of ``METHODS`` for ``"both"``."""
    if method not in METHOD_CHOICES:
        raise ValueError(f"method={method!r}: must be one of {METHOD_CHOICES}")
    return METHODS if method == "both" else (method,)


def setting_values(table: Any, name: str, fallback: bool = True) -> list[Any]:
    """The distinct values of column ``name`` that describe the run's setting (None dropped).

    For ``n`` only rows that made all their main draws count (``shortcut`` none or absent): a shortcut
    row's ``n`` is the draws it made (0 when skipped, fewer when stopped early or chosen by ISS); when
    every row took a shortcut, the largest ``n`` made stands for the run (``fallback``) or nothing does.
    Computed column-wise (``pyarrow.compute``), without a Python object per row.
    """
    column = table.column(name)
    if name == "n" and "shortcut" in table.column_names:
        shortcut = table.column("shortcut")
        full_rows = pc.fill_null(pc.equal(shortcut, "none"), True)
        full = pc.drop_null(column.filter(full_rows))
        if len(full) or not fallback:
            column = full
        else:
            made = pc.max(column).as_py()
            return [] if made is None else [made]
    return [v for v in pc.unique(column).to_pylist() if v is not None]


def distinct_values(table: Any, name: str) -> str:
    """The distinct setting values of column ``name`` joined by '/', or '' when the column is absent
    (``setting_values``: a shortcut row's ``n`` is not the run's n)."""
    if name not in table.column_names:
        return ""
    values = sorted(set(setting_values(table, name)))
    return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def certified_accuracy_table(
    runs: Mapping[str, Any], radii: Sequence[float] = TABLE_RADII, method: str = "both"
) -> list[dict[str, Any]]:
    """Rows of the certified-accuracy table, one per run and method (runs in the given order); a method
    without radii in a run (T-CERTIFY of a published CERTIFY log) has no row.

    Each row maps ``run``, ``method`` (CERTIFY / T-CERTIFY), ``sigma``, ``n`` (distinct values in the
    run), ``images`` (N), ``radius_column(r)`` -> round(100 * CA(r), 1) for r in ``radii``,
    ``ACR`` -> round(ACR, 3), ``abstain %`` -> round(100 * abstain rate, 1) and ``samples / image`` ->
    the mean pilot + main draws made per image (evaluation shortcuts make fewer; "" if unknown).
    """
    if not runs:
        raise ValueError("runs: no result tables given")
    grid = check_radii(radii)
    rows: list[dict[str, Any]] = []
    for name, table in runs.items():
        if table.num_rows == 0:
            raise ValueError(f"runs[{name!r}]: no images (empty result table)")
        present = methods_present(table)
        for m in selected_methods(method):
            if present and m not in present:  # e.g. T-CERTIFY of a published CERTIFY log
                continue
            radius, correct, predict = method_columns(table, m)
            row: dict[str, Any] = {
                "run": name, "method": METHOD_NAMES[m], "sigma": distinct_values(table, "sigma"),
                "n": distinct_values(table, "n"), "images": int(table.num_rows),
            }
            accuracy = certified_accuracy(radius, correct, grid)
            row.update({radius_column(float(r)): round(100 * float(a), 1) for r, a in zip(grid, accuracy,
                                                                                        strict=True)})
            row["ACR"] = round(average_certified_radius(radius, correct), 3)
            row["abstain %"] = round(100 * abstain_rate(predict), 1)
            samples = sample_summary(table, table.num_rows).get("samples/per_image")
            row[SAMPLES_COLUMN] = "" if samples is None else int(round(samples))
            rows.append(row)
    targets = {name: target_summary(table, table.num_rows) for name, table in runs.items()}
    if any(targets.values()):
        for row in rows:
            found = targets[row["run"]]
            row[TARGET_COLUMN] = (f"{100 * found['target/certified_fraction']:.1f} @ "
                                  f"{found['target/radius']:g}" if found else "")
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        raise ValueError("rows: empty table")
    return list(rows[0].keys())


def _cell(column: str, value: Any) -> str:
    """Percent columns with one decimal, ``ACR`` with three, anything else as ``str``."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}" if column == "ACR" else f"{value:.1f}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]], path: str | Path | None = None,
                bold_best: bool = True) -> str:
    """The rows as a GitHub Markdown table (written to ``path`` if given).

    With ``bold_best``, the largest value of each radius column and of ``ACR`` is bold, as in the
    paper's Table 1 (ties all bold; not for a best of 0, nor when there is only one row).
    """
    columns = _columns(rows)
    metric_columns = [c for c in columns if c not in ID_COLUMNS
                      and c not in ("abstain %", SAMPLES_COLUMN, TARGET_COLUMN)]
    best = {c: max(float(r[c]) for r in rows) for c in metric_columns} if len(rows) > 1 else {}
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(":---" if c in ("run", "method") else "---:" for c in columns) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            text = _cell(c, row[c])
            if bold_best and c in best and float(row[c]) == best[c] and np.isfinite(best[c]) and best[c] > 0:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def to_csv(rows: Sequence[Mapping[str, Any]], path: str | Path | None = None) -> str:
    """The rows as CSV with a header line (written to ``path`` if given); numbers unformatted."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text
