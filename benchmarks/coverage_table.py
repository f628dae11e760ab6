"""Coverage and tightness of CERTIFY and the three T-CERTIFY modes by simulation (Markdown table).

For each known class distribution, draw ``trials`` independent (pilot n0, main n) multinomial count pairs,
run every mode on the same counts and report: failure rate (not abstained and wrong class or radius above
the true radius sigma/2 (Phi^-1(p_A) - Phi^-1(p_B))), mean radius over all trials (0 for abstain),
abstain rate, and how often a mode's radius falls below CERTIFY's on the same counts. ``*_max`` modes use
the Clopper-Pearson bound of the largest other count instead of eq. 14 (``pb_bound="max"``).

    .venv/bin/python benchmarks/coverage_table.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
from scipy import special

from adre_ray.smoothing import ABSTAIN, certify_counts, tcertify_counts

MODES = ("certify", "paper", "bonferroni", "pilot", "bonferroni_max", "pilot_max")


def long_tail(top: float, runner_up: float, classes: int) -> np.ndarray:
    tail = 1.0 / np.arange(1, classes - 1) ** 1.2
    return np.concatenate([[top, runner_up], (1.0 - top - runner_up) * tail / tail.sum()])


# name: (class probabilities, alpha, n)
DISTRIBUTIONS = {
    "2 classes (0.7/0.3)": (np.array([0.7, 0.3]), 0.1, 2000),
    "3 classes (0.6/0.3/0.1)": (np.array([0.6, 0.3, 0.1]), 0.1, 2000),
    "10 classes (0.6/0.25/tail)": (np.array([0.6, 0.25] + [0.15 / 8] * 8), 0.1, 2000),
    "1000 classes long tail (0.6/0.1)": (long_tail(0.6, 0.1, 1000), 0.05, 5000),
    "top just above 1/2 (0.52/0.38)": (np.array([0.52, 0.38, 0.05, 0.03, 0.02]), 0.1, 10_000),
}


def simulate(probs: np.ndarray, alpha: float, n: int, n0: int, trials: int, sigma: float, seed: int
             ) -> dict[str, np.ndarray]:
    """Per mode: arrays (trials,) of radius (0 on abstain), abstain flag and failure flag."""
    true_class = int(np.argmax(probs))
    p_b = float(np.delete(probs, true_class).max())
    true_radius = sigma / 2 * (special.ndtri(probs[true_class]) - special.ndtri(p_b))
    rng = np.random.default_rng(seed)
    pilots = rng.multinomial(n0, probs, size=trials)
    mains = rng.multinomial(n, probs, size=trials)
    out = {mode: np.zeros((3, trials)) for mode in MODES}
    for i, (pilot, counts) in enumerate(zip(pilots, mains, strict=True)):
        for mode in MODES:
            base, _, bound = mode.partition("_")
            res = (certify_counts(pilot, counts, sigma, alpha) if mode == "certify"
                   else tcertify_counts(pilot, counts, sigma, alpha, mode=base, pb_bound=bound or "sum"))
            abstain = res.predict == ABSTAIN
            fail = not abstain and (res.predict != true_class or res.radius > true_radius)
            out[mode][:, i] = (res.radius, abstain, fail)
    return out


def random_vectors_below_certify(pairs: int, alpha: float, sigma: float, seed: int) -> dict[str, float]:
    """Fraction of random count pairs (Dirichlet class probabilities, 2-100 classes, n0 <= 100,
    n <= 3000) on which each T-CERTIFY mode's radius is below CERTIFY's on the same counts."""
    rng = np.random.default_rng(seed)
    below = dict.fromkeys(MODES[1:], 0)
    for _ in range(pairs):
        classes = int(rng.choice([2, 3, 10, 100]))
        probs = rng.dirichlet(np.full(classes, float(rng.choice([0.2, 1.0, 5.0]))))
        pilot = rng.multinomial(int(rng.integers(1, 101)), probs)
        counts = rng.multinomial(int(rng.integers(1, 3001)), probs)
        reference = certify_counts(pilot, counts, sigma, alpha).radius
        for mode in below:
            base, _, bound = mode.partition("_")
            below[mode] += tcertify_counts(pilot, counts, sigma, alpha, mode=base,
                                           pb_bound=bound or "sum").radius < reference
    return {mode: value / pairs for mode, value in below.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--random-pairs", type=int, default=3000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"trials={args.trials} per distribution, n0={args.n0}, sigma={args.sigma}, seed={args.seed}; "
          "failure allowance = alpha + 3 sqrt(alpha (1 - alpha) / trials)\n")
    print("| distribution | alpha | n | mode | failure rate | allowance | mean radius | abstain rate "
          "| radius < CERTIFY |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"pilot_max/pilot": [], "bonferroni_max/bonferroni": [],
                                      "pilot/paper": [], "bonferroni/paper": [], "pilot/certify": [],
                                      "bonferroni/certify": [], "paper/certify": []}
    for k, (name, (probs, alpha, n)) in enumerate(DISTRIBUTIONS.items()):
        sims = simulate(probs, alpha, n, args.n0, args.trials, args.sigma, args.seed + k)
        allowance = alpha + 3 * math.sqrt(alpha * (1 - alpha) / args.trials)
        mean = {mode: float(sims[mode][0].mean()) for mode in MODES}
        for mode in MODES:
            radius, abstain, fail = sims[mode]
            below = float(np.mean(radius < sims["certify"][0]))
            print(f"| {name} | {alpha} | {n} | {mode} | {fail.mean():.4f} | {allowance:.4f} | "
                  f"{mean[mode]:.4f} | {abstain.mean():.4f} | {below:.4f} |")
        for key in ratios:
            top, bottom = key.split("/")
            ratios[key].append(mean[top] / mean[bottom])
    print("\nMean-radius ratios per distribution (same order as the table):")
    for key, values in ratios.items():
        print(f"- {key}: " + ", ".join(f"{v:.4f}" for v in values))
    below = random_vectors_below_certify(args.random_pairs, 0.01, args.sigma, args.seed)
    print(f"\nRandom count pairs ({args.random_pairs}, alpha=0.01), fraction with radius below CERTIFY's: "
          + ", ".join(f"{mode} {value:.4f}" for mode, value in below.items()))
    print(f"\n(elapsed {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
