"""Evaluation shortcuts and sequential certification on REAL count distributions (no model).

Per image the top-class probability p_A comes from a published certification log at n = 100,000:

- ``mnist``: Levine et al.'s small MNIST model (``raw_count`` column: the top class's count);
- ``cifar10`` / ``imagenet``: Cohen et al.'s ResNet-110 / ResNet-50 logs; the count is recovered by
  inverting radius = sigma Phi^-1(Clopper-Pearson lower bound) (the middle of the counts whose radius
  prints as the logged 3 digits). The level of each log is inferred as the alpha in {0.001, 0.01} under
  which every logged radius is attainable: the sigma = 0.12 log matches 0.001, the 0.25 / 0.5 / 1.0 logs
  only 0.01 (their largest radius, 3.91 sigma, is the all-count radius at 0.01; at 0.001 it would be
  3.81 sigma).

The true p_A of an image is (count + 1/2) / (n + 1). Abstained rows of Cohen's logs carry no count: their
p_A is drawn uniformly between 0.4 and the log's certification threshold K / n (just below it, where
stopping is hardest). The pilot class is taken to be the logged prediction; for an abstained row it is
assumed to be the label (so skipping never helps there). Only the count of the pilot class matters for
CERTIFY, so each shard's count is Bin(shard, p_A); the pilot count (for ISS) is Bin(n0, p_A). Every
variant reuses the same draws (as the Ray driver reuses shard noise). Certification here uses
alpha = 0.001 (``--alpha``), n0 = 100.

Variants: ``full`` (every image n0 + n), ``skip+early`` (today's exact shortcuts: skip misclassified,
early abstain with the schema-3 ``cp`` rule, one shard per wave), ``skip+early(product)`` (the tighter
early-abstain rule), ``decided`` (table-decided stopping alone), ``skip+decided`` (+ today's exact
shortcuts), ``skip+early+iss`` (all of today's), ``skip+decided+iss`` (all combined). Reported: mean
samples per image and the saving, the CERTIFY table (certified accuracy at the decide grid's radii),
images whose table bucket differs from the full run's in the same repeat (per image rate vs delta), ACR
and its change, certificates larger than the true radius (vs alpha). Then early abstain alone (stops and
mean draws at the stop, both rules) and ``--target-radius`` (samples per image for all images and for
those certified at r with margin, i.e. true radius >= r + sigma / 4; decisions vs the full run's).

    .venv/bin/python benchmarks/shortcut_simulation.py --repeats 20
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import special

from adre_ray.smoothing.sequential import (
    bucket_of_radius,
    certify_radius,
    decide_plan,
    early_abstain_threshold,
    target_plan,
)
from adre_ray.smoothing.shortcuts import (
    certify_threshold,
    iss_sample_size,
    should_stop_early_cp,
    wave_level,
)

REAL = Path(os.environ.get("ADRE_REAL_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
"""The published logs (``../shared/data/real``; ``--real-dir`` or ``$ADRE_REAL_DIR`` elsewhere)."""
N_LOG = 100_000
SOURCES = {  # name: (log file under REAL, sigma)
    "mnist_s0.25": ("levine2020_small_mnist/noise_0.25/certify_N_100000.tsv", 0.25),
    **{f"cifar10_s{s}": (f"cohen2019/cifar10/resnet110/noise_{s}_sigma_{s}.tsv", float(s))
       for s in ("0.12", "0.25", "0.50", "1.00")},
    **{f"imagenet_s{s}": (f"cohen2019/imagenet/resnet50/noise_{s}_sigma_{s}.tsv", float(s))
       for s in ("0.25", "0.50", "1.00")},
}
N0 = 100


@dataclass
class Image:
    p_a: float  # true probability of the pilot class
    pilot_is_label: bool


def radius_table(sigma: float, alpha: float, n: int = N_LOG) -> np.ndarray:
    """CERTIFY's radius for every count 0..n at ``alpha`` (nan below the certification threshold)."""
    k = np.arange(n + 1)
    lower = np.where(k > 0, special.betaincinv(np.maximum(k, 1), n - k + 1, alpha), 0.0)
    return np.where(lower >= 0.5, sigma * special.ndtri(lower), np.nan)


def invert_radii(radii: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
    """Counts whose radius prints as each logged radius, and the level that makes all of them attainable."""
    for alpha in (0.001, 0.01):
        table = radius_table(sigma, alpha)
        printed = np.array([float(f"{r:.3g}") if np.isfinite(r) else np.nan for r in table])
        counts = []
        for r in radii:
            hits = np.flatnonzero(printed == float(f"{r:.3g}"))
            if hits.size == 0:
                break
            counts.append(int(hits[hits.size // 2]))
        else:
            return np.array(counts), alpha
    raise ValueError(f"sigma={sigma}: logged radii match no count at alpha 0.001 or 0.01")


def load_images(name: str, rng: np.random.Generator, real: Path = REAL) -> tuple[list[Image], float]:
    """The images of one log and the level the log was made at."""
    path, sigma = SOURCES[name]
    lines = (real / path).read_text().splitlines()
    head = lines[0].split("\t")
    rows = [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]
    certified = [r for r in rows if int(r["predict"]) >= 0]
    if "raw_count" in head:
        counts = {id(r): int(r["raw_count"]) for r in rows}
        log_alpha = 0.001
    else:
        found, log_alpha = invert_radii(np.array([float(r["radius"]) for r in certified]), sigma)
        counts = {id(r): int(k) for r, k in zip(certified, found, strict=True)}
    threshold = certify_threshold(N_LOG, log_alpha)
    images = []
    for r in rows:
        k = counts.get(id(r))
        p_a = (k + 0.5) / (N_LOG + 1) if k is not None else rng.uniform(0.4, threshold / N_LOG)
        predict = int(r["predict"])
        images.append(Image(p_a, predict < 0 or predict == int(r["label"])))
    return images, log_alpha


@dataclass
class Outcome:
    samples: int
    radius: float  # CERTIFY radius, -inf on abstain (any class)
    correct: bool  # pilot class == label and not abstained

    def table_radius(self) -> float:
        return self.radius if self.correct else -math.inf


def early_stop(cum: np.ndarray, n: int, shard: int, delta: float, alpha: float, rule: str) -> int | None:
    """Main draws made when early abstain (one shard per wave) stops, or None."""
    checks = -(-n // shard) - 1
    k, level = certify_threshold(n, alpha), wave_level(delta, checks)
    for w in range(checks):
        m = (w + 1) * shard
        stop = (should_stop_early_cp(int(cum[w]), m, n, k, level) if rule == "cp"
                else int(cum[w]) <= early_abstain_threshold(m, n, k, level))
        if stop:
            return m
    return None


def decided(cum: np.ndarray, n: int, shard: int, sigma: float, alpha: float, delta: float, correct: bool
            ) -> Outcome:
    """Table-decided stopping at the looks 1, 2, 4, ... shards."""
    plan = decide_plan(n, shard, sigma, alpha, None, delta)
    for m in plan.looks:
        n_a = int(cum[-(-m // shard) - 1])
        verdict = plan.check(n_a, m)
        if verdict.stop:
            radius = -math.inf if verdict.abstain else certify_radius(n_a, m, sigma, verdict.level)
            return Outcome(N0 + m, radius, correct and radius > -math.inf)
    raise AssertionError("the last look always stops")


def simulate_image(image: Image, rng: np.random.Generator, sigma: float, args: argparse.Namespace
                   ) -> dict[str, Outcome]:
    n, shard, alpha, delta = args.n, args.shard_size, args.alpha, args.delta
    cum = rng.binomial(shard, image.p_a, size=n // shard).cumsum()
    pilot_a = int(rng.binomial(N0, image.p_a))
    ok = image.pilot_is_label

    def plain(m: int) -> Outcome:
        radius = certify_radius(int(cum[m // shard - 1]), m, sigma, alpha)
        return Outcome(N0 + m, radius, ok and radius > -math.inf)

    full = plain(n)
    skipped = Outcome(N0, -math.inf, False) if not ok else None
    out = {"full": full}
    for rule, name in (("cp", "skip+early"), ("product", "skip+early(product)")):
        stop = early_stop(cum, n, shard, delta, alpha, rule)
        out[name] = skipped or (Outcome(N0 + stop, -math.inf, False) if stop else full)
        out[f"early[{rule}]"] = Outcome(N0 + stop, -math.inf, False) if stop else full
    out["decided"] = decided(cum, n, shard, sigma, alpha, delta, ok)
    out["skip+decided"] = skipped or out["decided"]
    pilot = np.array([pilot_a, *rng.multinomial(N0 - pilot_a, np.full(9, 1 / 9))])
    n_iss = iss_sample_size(pilot, n, shard, sigma, alpha, args.iss_loss)
    iss = plain(n_iss)
    stop = early_stop(cum[: n_iss // shard], n_iss, shard, delta, alpha, "cp")
    out["skip+early+iss"] = skipped or (Outcome(N0 + stop, -math.inf, False) if stop else iss)
    out["skip+decided+iss"] = skipped or decided(cum[: n_iss // shard], n_iss, shard, sigma, alpha, delta, ok)
    for r in args.target_radii:
        plan = target_plan(n, shard, sigma, alpha, r)
        for m in plan.looks:
            verdict = plan.check(int(cum[-(-m // shard) - 1]), m)
            if verdict.stop:
                accepted = verdict.decision == "certified"
                out[f"target@{r:g}"] = Outcome(N0 + m, r if accepted else -math.inf, ok and accepted)
                out[f"target@{r:g}:{verdict.decision}"] = out[f"target@{r:g}"]
                break
    return out


TABLE_VARIANTS = ("full", "skip+early", "skip+early(product)", "decided", "skip+decided", "skip+early+iss",
                  "skip+decided+iss")


def report(name: str, sigma: float, log_alpha: float, images: list[Image],
           runs: list[list[dict[str, Outcome]]], args: argparse.Namespace) -> str:
    grid = decide_plan(args.n, args.shard_size, sigma, args.alpha, None, args.delta).grid
    true_radius = np.array([sigma * special.ndtri(im.p_a) for im in images])
    lines = [f"\n### {name} (sigma = {sigma}, {len(images)} images, log made at alpha = {log_alpha:g}, "
             f"{len(runs)} repeats)\n",
             "| variant | samples / image | saving | " + " | ".join(f"r={g:g}" for g in grid)
             + " | ACR | ACR change | table changes / image | certificates > true radius / image |",
             "|---" * (len(grid) + 7) + "|"]
    full_samples = np.mean([o["full"].samples for run in runs for o in run])
    full_buckets = np.array([[bucket_of_radius(o["full"].table_radius(), grid) for o in run] for run in runs])
    full_acr = np.mean([[max(0.0, o["full"].table_radius()) for o in run] for run in runs])
    for variant in TABLE_VARIANTS:
        outcomes = [[o[variant] for o in run] for run in runs]
        samples = np.mean([o.samples for run in outcomes for o in run])
        table_r = np.array([[o.table_radius() for o in run] for run in outcomes])
        buckets = np.array([[bucket_of_radius(r, grid) for r in run] for run in table_r])
        acc = [float(np.mean(table_r >= g - 1e-9)) for g in grid]
        acr = float(np.mean(np.maximum(table_r, 0.0)))
        radii = np.array([[o.radius for o in run] for run in outcomes])
        invalid = float(np.mean(radii > true_radius[None, :] + 1e-12))
        changes = float(np.mean(buckets != full_buckets))
        lines.append(f"| {variant} | {samples:,.0f} | {full_samples / samples:.2f}x | "
                     + " | ".join(f"{a:.3f}" for a in acc)
                     + f" | {acr:.4f} | {acr - full_acr:+.4f} | {changes:.5f} | {invalid:.5f} |")
    lines.append("")
    for rule in ("cp", "product"):
        made = [o[f"early[{rule}]"] for run in runs for o in run]
        stopped = [o.samples - N0 for o in made if o.radius == -math.inf and o.samples < N0 + args.n]
        lines.append(f"- early abstain alone, rule `{rule}`: {len(stopped) / len(made):.3f} of the images "
                     f"stopped, at {np.mean(stopped) if stopped else 0:,.0f} main draws on average; "
                     f"{np.mean([o.samples for o in made]):,.0f} samples / image")
    for r in args.target_radii:
        key = f"target@{r:g}"
        margin = true_radius >= r + sigma / 4
        all_samples = np.mean([o[key].samples for run in runs for o in run])
        margin_samples = (np.mean([o[key].samples for run in runs for o, m in zip(run, margin, strict=True)
                                   if m]) if margin.any() else math.nan)
        accepted = np.array([[o[key].radius >= 0 for o in run] for run in runs])
        full_at_r = np.array([[o["full"].radius >= r - 1e-9 for o in run] for run in runs])
        wrong = float(np.mean(accepted & (true_radius[None, :] < r)))
        decisions = {d: float(np.mean([f"{key}:{d}" in o for run in runs for o in run]))
                     for d in ("certified", "not_certified", "abstain")}
        lines.append(f"- target radius {r:g}: {all_samples:,.0f} samples / image "
                     f"({full_samples / all_samples:.1f}x fewer than the full run); images certified at "
                     f"r with margin (true radius >= r + sigma/4, {int(margin.sum())} of {len(images)}): "
                     f"{margin_samples:,.0f} samples / image "
                     f"({full_samples / margin_samples:.1f}x); decisions " +
                     ", ".join(f"{d} {v:.3f}" for d, v in decisions.items()) +
                     f"; full-run CERTIFY certifies {full_at_r.mean():.3f} at r; accepted-correct "
                     f"{np.mean([[o[key].correct for o in run] for run in runs]):.3f}; wrong accepts (true "
                     f"radius < r) {wrong:.5f} per image")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated: {', '.join(SOURCES)}")
    parser.add_argument("--repeats", type=int, default=4, help="simulated runs of every image")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--delta", type=float, default=1e-4)
    parser.add_argument("--iss-loss", type=float, default=0.05)
    parser.add_argument("--target-radii", type=lambda s: [float(v) for v in s.split(",")],
                        default=[0.25, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-dir", type=Path, default=REAL,
                        help="the published logs (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.real_dir.is_dir():
        print(f"no published logs at {args.real_dir}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"n0={N0}, n={args.n}, shard_size={args.shard_size} (decide / target looks after 1, 2, 4, ... "
          f"shards), alpha={args.alpha}, delta={args.delta} (early abstain and decided), "
          f"iss_max_radius_loss={args.iss_loss}, seed={args.seed}; table columns: CERTIFY certified accuracy")
    for k, name in enumerate(args.sources.split(",")):
        rng = np.random.default_rng(args.seed + 1000 * k)
        images, log_alpha = load_images(name, rng, args.real_dir)
        sigma = SOURCES[name][1]
        runs = [[simulate_image(im, rng, sigma, args) for im in images] for _ in range(args.repeats)]
        print(report(name, sigma, log_alpha, images, runs, args), flush=True)
    print(f"\n(elapsed {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
