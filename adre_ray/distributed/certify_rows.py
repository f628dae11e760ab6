"""A certified image's ``RESULT_SCHEMA`` row (adre_ray.analysis.results), and the run's summary text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adre_ray.analysis.metrics import DEFAULT_RADII
from adre_ray.smoothing import (
    ABSTAIN,
    NOISE_SCHEME,
    certify_counts,
    predict_counts,
    tcertify_counts,
)
from adre_ray.smoothing.certify import effective_pb_bound
from adre_ray.smoothing.shortcuts import ABSTAINING_SHORTCUTS


def result_row(idx: int, label: int, pilot_counts: np.ndarray, counts: np.ndarray, *, sigma: float,
               alpha: float, mode: str, grid: Sequence[float], seed: int, time_s: float, checkpoint: str,
               train_run_id: str | None, pb_bound: str = "sum", shortcut: str = "none",
               train_sigma: float | None = None, noise_scheme: int = NOISE_SCHEME,
               precision: str | None = None, level: float | None = None,
               target_radius: float | None = None, decision: str | None = None) -> dict[str, Any]:
    """One ``RESULT_SCHEMA`` row: PREDICT on ``counts``, CERTIFY and T-CERTIFY on (pilot_counts, counts).

    CERTIFY and T-CERTIFY see the same counts and the same pilot class cA, so T-CERTIFY's radius is
    >= CERTIFY's whenever the grid holds 1.0 (mode paper; see adre_ray.smoothing.certify).
    ``counts`` are the main draws actually made (``n`` = their sum, ``samples_used`` = n0 + n).
    ``shortcut`` in ``ABSTAINING_SHORTCUTS`` (skipped_misclassified: no main draws; early_abstain: the
    draws made before the stop) gives an abstention row: both methods -1, radius 0, not correct, the
    bounds NaN; ``predict`` is then PREDICT on the draws made (the pilot's when there are none).
    ``level``: the level CERTIFY and T-CERTIFY are computed at (default ``alpha``; a sequential look's
    share of alpha, adre_ray.smoothing.sequential); ``alpha`` stays the overall guarantee.
    """
    pilot_counts = np.asarray(pilot_counts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    level = alpha if level is None else level
    if shortcut in ABSTAINING_SHORTCUTS:
        predicted = predict_counts(counts if counts.sum() > 0 else pilot_counts, alpha)
        methods = _abstention(effective_pb_bound(mode, pb_bound))
    else:
        predicted = predict_counts(counts, alpha)
        methods = _certificates(label, pilot_counts, counts, sigma, level, mode, grid, pb_bound)
    return {
        "idx": int(idx), "label": int(label), "predict": int(predicted.predict), **methods,
        "tcertify_mode": mode, "counts": counts.tolist(), "pilot_counts": pilot_counts.tolist(),
        "n0": int(pilot_counts.sum()), "n": int(counts.sum()),
        "alpha": float(alpha), "sigma": float(sigma), "seed": int(seed), "time_s": float(time_s),
        "checkpoint": checkpoint, "train_run_id": train_run_id,
        "train_sigma": None if train_sigma is None else float(train_sigma), "noise_scheme": noise_scheme,
        "samples_used": int(pilot_counts.sum() + counts.sum()), "shortcut": shortcut,
        "precision": precision, "certify_level": float(level), "target_radius": target_radius,
        "decision": decision,
    }


def _certificates(label: int, pilot_counts: np.ndarray, counts: np.ndarray, sigma: float, level: float,
                  mode: str, grid: Sequence[float], pb_bound: str) -> dict[str, Any]:
    """The CERTIFY and T-CERTIFY columns of a row, both at ``level``."""
    certified = certify_counts(pilot_counts, counts, sigma, level)
    tcertified = tcertify_counts(pilot_counts, counts, sigma, level, mode=mode, grid=tuple(grid),
                                 pb_bound=pb_bound)
    return {
        "correct": bool(certified.predict == label), "correct_tcertify": bool(tcertified.predict == label),
        "certify_predict": int(certified.predict), "tcertify_predict": int(tcertified.predict),
        "radius_certify": float(certified.radius), "radius_tcertify": float(tcertified.radius),
        "pA_lower": float(tcertified.pA_lower), "pB_upper": float(tcertified.pB_upper),
        "alpha_prime": float(tcertified.alpha_prime), "pA_lower_certify": float(certified.pA_lower),
        "pb_bound": tcertified.pb_bound,
    }


def _abstention(pb_bound: str) -> dict[str, Any]:
    """The CERTIFY and T-CERTIFY columns of an image a shortcut abstained on: -1, radius 0, bounds NaN."""
    return {
        "correct": False, "correct_tcertify": False, "certify_predict": ABSTAIN, "tcertify_predict": ABSTAIN,
        "radius_certify": 0.0, "radius_tcertify": 0.0, "pA_lower": math.nan, "pB_upper": math.nan,
        "alpha_prime": math.nan, "pA_lower_certify": math.nan, "pb_bound": pb_bound,
    }


def format_summary(summary: dict[str, float], out_dir: Path | str) -> str:
    """A short text table: certified accuracy per radius for CERTIFY and T-CERTIFY, ACR, abstain rates."""
    radii = [r for r in DEFAULT_RADII]
    head = "radius      " + " ".join(f"{r:>5.2f}" for r in radii) + "    ACR  abstain"
    lines = [f"results: {out_dir}  ({int(summary.get('certify/num_images', 0))} images, "
             f"{summary.get('samples_per_s', 0.0):.0f} samples/s this run)", head]
    for method in ("certify", "tcertify"):
        accs = " ".join(f"{summary[f'{method}/cert_acc@{r:.2f}']:>5.3f}" for r in radii)
        lines.append(f"{method:<11} {accs}  {summary[f'{method}/acr']:.3f}  "
                     f"{summary[f'{method}/abstain_rate']:.3f}")
    if "samples/per_image" in summary:
        taken = ", ".join(f"{key.split('/', 1)[1][:-5]} {value:.3f}" for key, value in summary.items()
                          if key.startswith("shortcut/"))
        lines.append(f"samples per image: {summary['samples/per_image']:.0f}"
                     + (f"  (shortcut rates: {taken})" if taken else ""))
    if "target/radius" in summary:
        lines.append(f"target radius {summary['target/radius']:g}: certified-correct "
                     f"{summary['target/certified_fraction']:.3f}  (decisions: " + ", ".join(
                         f"{name} {summary[f'target/{name}_rate']:.3f}"
                         for name in ("certified", "not_certified", "abstain")) + ")")
    return "\n".join(lines)
