"""Per-image agreement of an adre-ray certification folder with a published log that has ``raw_count``.

    python examples/levine2020/compare_published.py results/levine_s025 \\
        ../shared/data/real/levine2020_small_mnist/noise_0.25/certify_N_100000.tsv --output-dir DIR

Writes ``DIR/agreement.md`` (the summary below) and ``DIR/per_image.csv`` (one row per image: both runs'
label, CERTIFY class, top-class count and radius, and the z-score of the count difference).

What is compared, for the images of both (same idx):

- labels: must be equal (the same test image);
- CERTIFY class where both certify (neither abstains), and PREDICT (our PREDICT on the main counts) vs
  their CERTIFY class there;
- the top-class count (where both certify, so both counted the same class): both runs draw n
  Gaussian samples of the same model, so with p the published frequency ``raw_count / n`` and our
  count k, ``z = (k - raw_count) / sqrt(2 n p (1 - p))`` is ~N(0, 1)
  if the two runs sample the same classifier (independent draws; delta of two binomials). |z| > 4 on
  more than a handful of 1,000 images, or a mean z far from 0, would be a bug, not Monte Carlo error;
- the radius difference, with its binomial spread by the delta method: sd(radius) = sigma *
  sqrt(p (1 - p) / n) / phi(Phi^-1(p)) for each run, sqrt(2) of that for the difference.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

from adre_ray.analysis.results import read_results


def published(path: Path) -> dict[int, dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return {int(row["idx"]): row for row in csv.DictReader(handle, delimiter="\t")}


def compare(ours_dir: str, log: Path) -> tuple[list[dict], dict[str, float | str]]:
    theirs = published(log)
    rows = []
    for mine in read_results(ours_dir).to_pylist():
        other = theirs.get(mine["idx"])
        if other is None:
            continue
        n, sigma = mine["n"], mine["sigma"]
        their_n = n  # the published log was made at the same n (checked by the caller's protocol)
        # raw_count counts their pilot class: known (= predict) where they certify; where they abstain
        # it may be another class than our top one, so z is summarized over images both certify only
        cls = int(other["predict"]) if int(other["predict"]) >= 0 else int(np.argmax(mine["counts"]))
        k_theirs = int(other["raw_count"])
        k_ours = int(mine["counts"][cls])
        p = min(max((k_theirs + k_ours) / (n + their_n), 0.5 / n), 1 - 0.5 / n)
        z = (k_ours - k_theirs) / math.sqrt(2 * n * p * (1 - p))
        radius_sd = sigma * math.sqrt(p * (1 - p) / n) / norm.pdf(norm.ppf(p))
        rows.append({
            "idx": mine["idx"], "label_ours": mine["label"], "label_published": int(other["label"]),
            "certify_ours": mine["certify_predict"], "certify_published": int(other["predict"]),
            "predict_ours": mine["predict"], "count_ours": k_ours, "count_published": k_theirs,
            "class_compared": cls, "radius_ours": mine["radius_certify"],
            "radius_published": float(other["radius"]), "z_count": z,
            "radius_diff_sd": math.sqrt(2) * radius_sd})
    both = [r for r in rows if r["certify_ours"] >= 0 and r["certify_published"] >= 0]
    zs = np.array([r["z_count"] for r in both])  # where the class is known to be the same one
    diff = np.array([r["radius_ours"] - r["radius_published"] for r in both])
    sds = np.array([r["radius_diff_sd"] for r in both])
    summary = {
        "images": len(rows),
        "labels_equal": sum(r["label_ours"] == r["label_published"] for r in rows),
        "both_certify": len(both),
        "same_certify_class": sum(r["certify_ours"] == r["certify_published"] for r in both),
        "predict_equals_their_class": sum(r["predict_ours"] == r["certify_published"] for r in both),
        "abstain_ours": sum(r["certify_ours"] < 0 for r in rows),
        "abstain_published": sum(r["certify_published"] < 0 for r in rows),
        "abstain_disagree": sum((r["certify_ours"] < 0) != (r["certify_published"] < 0) for r in rows),
        "z_mean": float(zs.mean()), "z_sd": float(zs.std(ddof=1)),
        "z_abs_le_2": float(np.mean(np.abs(zs) <= 2)), "z_abs_le_3": float(np.mean(np.abs(zs) <= 3)),
        "z_abs_max": float(np.abs(zs).max()),
        "radius_diff_mean": float(diff.mean()), "radius_diff_abs_mean": float(np.abs(diff).mean()),
        "radius_within_2sd": float(np.mean(np.abs(diff) <= 2 * sds + 0.0005)),  # + the 3-digit rounding
        "radius_within_3sd": float(np.mean(np.abs(diff) <= 3 * sds + 0.0005)),
    }
    for radius in (0.0, 0.25, 0.5, 0.75, 1.0):
        ours_acc, their_acc = (
            np.mean([r[f"certify_{who}"] == r[f"label_{who}"] and r[f"radius_{who}"] >= radius for r in rows])
            for who in ("ours", "published"))
        summary[f"cert_acc@{radius:.2f} ours / published / diff (points)"] = (
            f"{100 * ours_acc:.1f} / {100 * their_acc:.1f} / {100 * (ours_acc - their_acc):+.1f}")
    acr = [np.mean([r[f"radius_{who}"] * (r[f"certify_{who}"] == r[f"label_{who}"]) for r in rows])
           for who in ("ours", "published")]
    summary["ACR ours / published / diff"] = f"{acr[0]:.4f} / {acr[1]:.4f} / {acr[0] - acr[1]:+.4f}"
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ours", help="adre-ray result folder")
    parser.add_argument("log", type=Path, help="published log with a raw_count column")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    rows, summary = compare(args.ours, args.log)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with open(args.output_dir / "per_image.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| quantity | value |", "| --- | --- |"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in summary.items()]
    (args.output_dir / "agreement.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
