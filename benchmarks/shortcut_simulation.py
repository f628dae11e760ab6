"""Evaluation shortcuts by count-level simulation (no model): samples per image, the table, ACR.

Two sources of per-image class probabilities:

``--source real`` (default; ``real_simulation``): the published certification logs in
``../shared/data/real`` (Levine et al.'s MNIST model: the top-class count ``raw_count`` of n = 100,000;
Cohen et al.'s CIFAR-10 ResNet-110 and ImageNet ResNet-50: the count recovered by inverting the
Clopper-Pearson radius). Compares the full run, today's shortcuts, the new sequential rules
(``adre_ray.smoothing.sequential``) and all combined, per sigma.

``--source synthetic``: ImageNet-size synthetic images, as follows. For each sigma, ``--images`` images
get class probabilities over 1,000 classes (see ``image_probs``) so
that the clean / wrong / abstain rates follow the published ImageNet runs of Cohen et al. (certified
accuracy of the correct images at sigma = 0.5: 57 / 46 / 37 / 29 % at r = 0 / 0.5 / 1.0 / 1.5; at sigma =
1.0: 44 / 38 / 33 / 26 / 19 / 15 / 12 % at r = 0 ... 3.0; 43 % and 56 % of the images wrong or abstained).
Pilot (n0 = 100) and main draws (n = 100,000, in shards of ``--shard-size``) are numpy multinomials, with
the shard draws shared by every variant exactly as the Ray driver shares shard noise. Variants:

  full            every image n0 + n draws (the reference table)
  skip            --skip-misclassified
  early           --early-abstain, delta as given, one shard per wave
  skip+early      both
  iss             --n-policy iss, --iss-max-radius-loss as given
  skip+early+iss  all three

Reported per variant: mean samples per image, the saving against full, certified accuracy (CERTIFY and
T-CERTIFY pilot mode, pb_bound max) at the radii, ACR, whether the table equals full's exactly, and for
early abstain the measured outcome-change rate (stopped images that the full run certifies) vs delta.

    .venv/bin/python benchmarks/shortcut_simulation.py --source synthetic --images 2000
    .venv/bin/python benchmarks/shortcut_simulation.py --repeats 20      # real logs
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import special

from adre_ray.smoothing import certify_counts, tcertify_counts
from adre_ray.smoothing.shortcuts import (
    certify_threshold,
    iss_sample_size,
    should_stop_early,
    wave_level,
)

CLASSES = 1000
N0 = 100
ALPHA = 0.001

# sigma: (radii of the published curve, certified accuracy there, wrong-or-abstain rate, radius cap)
PUBLISHED = {
    0.5: ((0.0, 0.5, 1.0, 1.5), (0.57, 0.46, 0.37, 0.29), 0.43),
    1.0: ((0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0), (0.44, 0.38, 0.33, 0.26, 0.19, 0.15, 0.12), 0.56),
}
ABSTAIN_SHARE = 0.4
"""Assumed share of abstentions among the wrong-or-abstained images (the logs give only the sum)."""


def image_probs(rng: np.random.Generator, sigma: float) -> tuple[np.ndarray, int]:
    """(class probabilities, label) of one simulated image.

    Correct images (top class = label): margin sigma * Phi^-1(p_top) drawn from the published curve,
    piecewise linear between its points, the mass above the last radius spread up to p_top = 0.99995.
    Wrong images: top class != label with p_top ~ U(0.55, 0.99). Abstaining images: p_top ~ U(0.2, 0.505),
    top class = label half of the time. The runner-up takes 30-80 % of the rest (kept below p_top), the
    other 998 classes share the remainder by a Dirichlet(0.1) draw.
    """
    radii, acc, wrong_or_abstain = PUBLISHED[sigma]
    u = rng.uniform()
    label = int(rng.integers(CLASSES))
    correct_mass = acc[0]
    if u < correct_mass:
        survival = rng.uniform(0, correct_mass)  # P(R >= r) = survival, inverted on the published points
        if survival <= acc[-1]:
            p_top = rng.uniform(special.ndtr(radii[-1] / sigma), 0.99995)
        else:
            r = float(np.interp(-survival, [-a for a in acc], radii))
            p_top = float(special.ndtr(r / sigma))
        top = label
    elif u < correct_mass + wrong_or_abstain * (1 - ABSTAIN_SHARE):
        p_top = rng.uniform(0.55, 0.99)
        top = (label + 1 + int(rng.integers(CLASSES - 1))) % CLASSES
    else:
        p_top = rng.uniform(0.2, 0.505)
        top = label if rng.uniform() < 0.5 else (label + 1 + int(rng.integers(CLASSES - 1))) % CLASSES
    rest = 1.0 - p_top
    p_two = min(rest * rng.uniform(0.3, 0.8), 0.95 * p_top)
    others = [c for c in range(CLASSES) if c != top]
    second = others[int(rng.integers(len(others)))]
    probs = np.zeros(CLASSES)
    tail = [c for c in others if c != second]
    probs[tail] = (rest - p_two) * rng.dirichlet(np.full(len(tail), 0.1))
    probs[top], probs[second] = p_top, p_two
    return probs / probs.sum(), label


@dataclass
class Outcome:
    samples: int
    radius_c: float  # CERTIFY radius if certified-correct, else 0
    radius_t: float  # T-CERTIFY
    certifies: bool = False  # without the stop: CERTIFY or T-CERTIFY certifies some class (the outcome)
    stopped: bool = False  # early abstain stopped the image


def evaluate(pilot: np.ndarray, counts: np.ndarray, label: int, sigma: float) -> tuple[float, float, bool]:
    """(CERTIFY radius if certified-correct else 0, the same for T-CERTIFY, whether either certifies)."""
    c = certify_counts(pilot, counts, sigma, ALPHA)
    t = tcertify_counts(pilot, counts, sigma, ALPHA, mode="pilot", pb_bound="max")
    return ((c.radius if c.predict == label else 0.0), (t.radius if t.predict == label else 0.0),
            bool(c.predict >= 0 or t.predict >= 0))


def early_stop(cum: np.ndarray, c_a: int, n_img: int, shard: int, delta: float) -> int | None:
    """Main draws made when early abstain stops an image of n_img draws (one shard per wave), or None."""
    checks = -(-n_img // shard) - 1
    k, level = certify_threshold(n_img, ALPHA), wave_level(delta, checks)
    for w in range(checks):
        if should_stop_early(int(cum[w, c_a]), (w + 1) * shard, n_img, k, level):
            return (w + 1) * shard
    return None


def simulate(sigma: float, images: int, n: int, shard: int, delta: float, loss: float, seed: int
             ) -> dict[str, list[Outcome]]:
    rng = np.random.default_rng(seed)
    shards = n // shard
    out: dict[str, list[Outcome]] = {v: [] for v in ("full", "skip", "early", "skip+early", "iss",
                                                      "skip+early+iss")}
    for _ in range(images):
        probs, label = image_probs(rng, sigma)
        pilot = rng.multinomial(N0, probs)
        cum = rng.multinomial(shard, probs, size=shards).cumsum(axis=0)  # counts after each shard
        c_a = int(np.argmax(pilot))
        full = Outcome(N0 + n, *evaluate(pilot, cum[-1], label, sigma))
        skipped = Outcome(N0, 0.0, 0.0) if c_a != label else None
        stop = early_stop(cum, c_a, n, shard, delta)
        early = Outcome(N0 + stop, 0.0, 0.0, full.certifies, stopped=True) if stop else full
        n_iss = iss_sample_size(pilot, n, shard, sigma, ALPHA, loss)
        iss = Outcome(N0 + n_iss, *evaluate(pilot, cum[n_iss // shard - 1], label, sigma)) \
            if n_iss < n else full
        stop = early_stop(cum, c_a, n_iss, shard, delta)
        iss_early = Outcome(N0 + stop, 0.0, 0.0, iss.certifies, stopped=True) if stop else iss
        out["full"].append(full)
        out["skip"].append(skipped or full)
        out["early"].append(early)
        out["skip+early"].append(skipped or early)
        out["iss"].append(iss)
        out["skip+early+iss"].append(skipped or iss_early)
    return out


def certified_accuracy(radius: np.ndarray, radii: tuple[float, ...]) -> list[float]:
    """Fraction certified-correct (radius > 0) with radius >= r, per r."""
    return [float(np.mean((radius > 0) & (radius >= r - 1e-9))) for r in radii]


def table(sigma: float, outcomes: dict[str, list[Outcome]], radii: tuple[float, ...], delta: float) -> str:
    full = outcomes["full"]
    base_samples = np.mean([o.samples for o in full])
    lines = [f"\n### sigma = {sigma}\n",
             "| variant | samples / image | saving | " + " | ".join(f"r={r:g}" for r in radii)
             + " | ACR | T-CERTIFY ACR | table = full | ACR loss | outcome changes (early) |",
             "|---" * (len(radii) + 8) + "|"]
    ref_c = np.array([o.radius_c for o in full])
    ref_t = np.array([o.radius_t for o in full])
    for variant, rows in outcomes.items():
        rc = np.array([o.radius_c for o in rows])
        rt = np.array([o.radius_t for o in rows])
        samples = float(np.mean([o.samples for o in rows]))
        acc = certified_accuracy(rc, radii)
        same = acc == certified_accuracy(ref_c, radii) and certified_accuracy(rt, radii) == \
            certified_accuracy(ref_t, radii) and rc.mean() == ref_c.mean() and rt.mean() == ref_t.mean()
        stopped = np.array([o.stopped for o in rows])
        changed = int(np.sum([o.stopped and o.certifies for o in rows]))  # stopped, yet the run
        # without the stop would have certified (a class, right or wrong)
        change = (f"{changed}/{int(stopped.sum())} stopped (rate {changed / len(rows):.5f}, bound {delta:g})"
                  if stopped.any() else "")
        lines.append(f"| {variant} | {samples:,.0f} | {base_samples / samples:.2f}x | "
                     + " | ".join(f"{a:.3f}" for a in acc)
                     + f" | {rc.mean():.4f} | {rt.mean():.4f} | {'yes' if same else 'no'} | "
                     f"{ref_c.mean() - rc.mean():.4f} | {change} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("--source", choices=("real", "synthetic"), default="real")
    known, argv = source.parse_known_args(argv)
    if known.source == "real":
        import real_simulation

        return real_simulation.main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=5_000)
    parser.add_argument("--delta", type=float, default=1e-4)
    parser.add_argument("--iss-loss", type=float, default=0.05)
    parser.add_argument("--sigmas", type=str, default="0.5,1.0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"{args.images} images per sigma, {CLASSES} classes, n0={N0}, n={args.n}, shard_size="
          f"{args.shard_size}, alpha={ALPHA}, early_abstain_delta={args.delta}, "
          f"iss_max_radius_loss={args.iss_loss}, seed={args.seed}; radius columns: certified accuracy of "
          "CERTIFY (r=0: certified-correct at any radius)")
    for k, sigma in enumerate(float(s) for s in args.sigmas.split(",")):
        outcomes = simulate(sigma, args.images, args.n, args.shard_size, args.delta, args.iss_loss,
                            args.seed + k)
        radii = PUBLISHED[sigma][0]
        print(table(sigma, outcomes, radii, args.delta), flush=True)
    print(f"\n(elapsed {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
