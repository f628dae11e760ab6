"""Certified-accuracy plots in the style of the seed paper's Figures 1 and 2 (PNG, matplotlib Agg).

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no global backend switch), so
plotting works headless and never touches a user's interactive session.

- ``plot_certified_accuracy``: CA(r) = #{i : correct_i and R_i >= r} / N against r for several runs
  (Figure 1: training methods compared under one certification method).
- ``plot_certify_vs_tcertify``: CERTIFY against T-CERTIFY on the same Monte Carlo counts of one run
  (Figure 2), with a per-image scatter of the two radii (T-CERTIFY >= CERTIFY in ``paper`` mode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from adre_ray.analysis.metrics import (
    average_certified_radius,
    certified_accuracy,
    method_columns,
    methods_present,
)
from adre_ray.analysis.tables import METHOD_NAMES, distinct_values, selected_methods

GRID_POINTS = 1001
"""Radii in the fine grid on which the step curves are evaluated."""

_LINESTYLE = {"certify": "-", "tcertify": "--"}


def radius_grid(max_radius: float, points: int = GRID_POINTS) -> np.ndarray:
    """``points`` radii evenly spaced on [0, r_max], r_max = 1.05 * max_radius rounded up to 0.25 (>= 0.5)."""
    top = max(0.5, float(np.ceil(1.05 * max(max_radius, 0.0) / 0.25) * 0.25))
    return np.linspace(0.0, top, points)


def _max_radius(tables: Sequence[Any], methods: Sequence[str]) -> float:
    best = 0.0
    for table in tables:
        for m in methods:
            if m not in (methods_present(table) or methods):
                continue
            radius, correct, _ = method_columns(table, m)
            certified = radius[correct & np.isfinite(radius)]
            if certified.size:
                best = max(best, float(certified.max()))
    return best


def describe(table: Any) -> str:
    """``sigma=0.25, n=100000, alpha=0.001, N=500`` from the run's columns (absent ones left out)."""
    parts = [f"{name}={value}" for name in ("sigma", "n", "alpha") if (value := distinct_values(table, name))]
    return ", ".join([*parts, f"N={table.num_rows}"])


def _check_table(name: str, table: Any) -> None:
    if not hasattr(table, "num_rows") or not hasattr(table, "column_names"):
        raise ValueError(f"{name}={type(table).__name__}: must be a pyarrow Table")
    if table.num_rows == 0:
        raise ValueError(f"{name}: no images (empty result table)")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _common(tables: Sequence[Any], name: str) -> str:
    """The value of column ``name`` if all runs share one, else ''."""
    values = {distinct_values(t, name) for t in tables}
    return values.pop() if len(values) == 1 else ""


def plot_certified_accuracy(runs: Mapping[str, Any], path: str | Path, method: str = "certify",
                            title: str | None = None) -> Path:
    """Certified accuracy against radius, one step curve per run (and per method if ``method="both"``).

    Curves are CA(r) on ``radius_grid``; the legend gives each run's ACR. Writes ``path`` (PNG by its
    suffix) and returns it.
    """
    if not runs:
        raise ValueError("runs: no result tables given")
    for name, table in runs.items():
        _check_table(f"runs[{name!r}]", table)
    methods = selected_methods(method)
    grid = radius_grid(_max_radius(list(runs.values()), methods))
    shared = {k: _common(list(runs.values()), k) for k in ("sigma", "n")}
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for color, (name, table) in zip(colors, runs.items(), strict=True):
        for m in methods:
            if m not in (methods_present(table) or methods):  # T-CERTIFY of a published CERTIFY log
                continue
            radius, correct, _ = method_columns(table, m)
            accuracy = certified_accuracy(radius, correct, grid)
            label = name if len(methods) == 1 else f"{name} {METHOD_NAMES[m]}"
            if not shared["sigma"]:
                label += f" (sigma={distinct_values(table, 'sigma')})"
            label += f", ACR={average_certified_radius(radius, correct):.3f}"
            ax.step(grid, accuracy, where="pre", color=color, linestyle=_LINESTYLE[m], label=label)
    ax.set_xlabel("l2 radius r")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, float(grid[-1]))
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    if title is None:
        what = " / ".join(METHOD_NAMES[m] for m in methods)
        setting = ", ".join(f"{k}={v}" for k, v in shared.items() if v)
        title = f"Certified accuracy ({what})" + (f", {setting}" if setting else "")
    ax.set_title(title)
    return _save(fig, path)


def plot_certify_vs_tcertify(table: Any, path: str | Path, title: str | None = None,
                             scatter: bool = True) -> Path:
    """CERTIFY vs T-CERTIFY on the same counts: both CA(r) curves, and (``scatter``) per-image radii.

    The scatter shows radius_tcertify against radius_certify for every image certified correctly by
    either method, with the diagonal: points above it are images where T-CERTIFY's radius is larger.
    Writes ``path`` and returns it.
    """
    _check_table("table", table)
    columns = {m: method_columns(table, m) for m in ("certify", "tcertify")}
    grid = radius_grid(_max_radius([table], tuple(columns)))
    fig = Figure(figsize=(12.0, 4.5) if scatter else (7.0, 4.5))
    ax = fig.add_subplot(1, 2 if scatter else 1, 1)
    for m, (radius, correct, _) in columns.items():
        ax.step(grid, certified_accuracy(radius, correct, grid), where="pre", linestyle=_LINESTYLE[m],
                color="C0" if m == "certify" else "C3",
                label=f"{METHOD_NAMES[m]}, ACR={average_certified_radius(radius, correct):.3f}")
    ax.set_xlabel("l2 radius r")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, float(grid[-1]))
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title("certified accuracy vs radius")
    if scatter:
        (r_cert, c_cert, _), (r_tcert, c_tcert, _) = columns["certify"], columns["tcertify"]
        shown = (c_cert | c_tcert) & np.isfinite(r_cert) & np.isfinite(r_tcert)
        ax2 = fig.add_subplot(1, 2, 2)
        x, y = np.where(c_cert, r_cert, 0.0)[shown], np.where(c_tcert, r_tcert, 0.0)[shown]
        ax2.scatter(x, y, s=8, alpha=0.6, color="C2", label=f"{int(shown.sum())} correctly certified images")
        ax2.plot([0.0, grid[-1]], [0.0, grid[-1]], color="gray", linewidth=1, linestyle=":", label="y = x")
        ax2.set_xlim(0.0, float(grid[-1]))
        ax2.set_ylim(0.0, float(grid[-1]))
        ax2.set_aspect("equal")
        ax2.set_xlabel("CERTIFY radius")
        ax2.set_ylabel("T-CERTIFY radius")
        ax2.grid(True, alpha=0.3)
        ax2.legend(loc="upper left", fontsize="small")
        ax2.set_title("per-image radii (0 if not correctly certified)", fontsize="medium")
    mode = distinct_values(table, "tcertify_mode")
    fig.suptitle(title or f"CERTIFY vs T-CERTIFY on the same counts ({describe(table)}"
                 + (f", mode={mode})" if mode else ")"))
    return _save(fig, path)
