"""Evaluation shortcuts: fewer Monte Carlo draws for the same certified-accuracy table (no torch, no Ray).

An evaluation needs certified accuracy at each radius and ACR. Three rules spend fewer of the n main
draws; each is a function of counts only, so the Ray driver and a notebook loop decide identically.
Proofs in docs/certification.md ("Evaluation shortcuts").

- ``skip_misclassified``: cA = argmax pilot != label -> no main draws. CERTIFY and T-CERTIFY certify cA
  or abstain, so such an image is never certified-correct: the table and ACR are exactly unchanged.
- ``early_abstain``: the main draws arrive in waves of shards; after each wave but the last,
  ``should_stop_early`` says whether the image will (very likely) abstain under the full n. With the
  certification threshold K = min { k : pA_lower(k, n, alpha) >= 1/2 } (CERTIFY certifies iff N_A >= K,
  and T-CERTIFY can certify only if CERTIFY does), a stop after m draws with a of them cA changes the
  outcome only on {final N_A >= K}; the rule bounds that probability by ``delta_w`` per check, so by
  ``delta`` per image over all checks (``wave_level``). ``delta = 0`` stops only when even all remaining
  draws being cA would leave N_A < K (the outcome then never changes).
- ``n_policy="iss"`` (input-specific sample size, Chen et al., AAAI 2022): ``iss_sample_size`` picks the
  image's n from its pilot counts only (the smallest allowed n whose plug-in CERTIFY radius is within
  ``max_radius_loss`` of the plug-in radius at the full n). The choice never sees the main draws, so
  conditionally on it CERTIFY / T-CERTIFY at that n keep their guarantee at alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from adre_ray.smoothing.bounds import cp_upper, pA_lower
from adre_ray.smoothing.sequential import count_threshold, decide_plan, early_abstain_threshold, target_plan

N_POLICIES = ("fixed", "iss")
"""Per-image sample size: fixed = n for all, iss = chosen from the pilot counts (``iss_sample_size``)."""
SHORTCUTS = ("none", "skipped_misclassified", "early_abstain", "iss", "decided", "target_radius")
"""Values of a result row's ``shortcut`` column (the last shortcut that changed the image's draws)."""
ABSTAINING_SHORTCUTS = ("skipped_misclassified", "early_abstain")
"""Shortcuts whose rows are abstentions by construction (never certified-correct)."""
EARLY_ABSTAIN_RULES = ("product", "cp")
"""Early-abstain tests: product = the tighter rule (default), cp = the rule of schema-3 runs."""


def certify_threshold(n: int, alpha: float) -> int:
    """K = min { k in [0, n] : pA_lower(k, n, alpha) >= 1/2 }, or n + 1 when no count certifies.

    CERTIFY certifies iff N_A >= K (pA_lower grows with N_A). T-CERTIFY's abstention test is
    pA_lower(N_A, n, a') > 1/2 with a' <= alpha, and pA_lower shrinks with the level, so T-CERTIFY can
    certify only when CERTIFY does: below K both abstain.
    """
    return count_threshold(n, 1.0, alpha, 0.0)  # radius 0 is reached iff pA_lower >= 1/2


def wave_level(delta: float, checks: int) -> float:
    """delta / checks: the per-check level whose union over ``checks`` checks is <= delta."""
    return delta / checks if checks > 0 else 0.0


def should_stop_early(n_A: int, m: int, n: int, threshold: int, level: float, rule: str = "product") -> bool:
    """After ``m`` of ``n`` main draws with ``n_A`` of them cA: stop (the image will abstain) or not.

    ``product`` (default): stop iff n_A <= c, c the largest count with
    sup_p P(Bin(m, p) <= c) P(Bin(n - m, p) >= K - c) <= level. The draws so far and the remaining ones
    are independent, so P(stop and final N_A >= K) <= P(N_A,m <= c) P(R >= K - c) <= level for every p_A.
    ``cp``: ``should_stop_early_cp``, which bounds the same event by the smaller of the two factors.
    """
    if rule == "cp":
        return should_stop_early_cp(n_A, m, n, threshold, level)
    if rule != "product":
        raise ValueError(f"early_abstain_rule={rule!r}: must be one of {', '.join(EARLY_ABSTAIN_RULES)}")
    return n_A <= early_abstain_threshold(m, n, threshold, level)


def should_stop_early_cp(n_A: int, m: int, n: int, threshold: int, level: float) -> bool:
    """After ``m`` of ``n`` main draws with ``n_A`` of them cA: stop (the image will abstain) or not.

    r = n - m draws remain; the final count is n_A + R, R ~ Bin(r, p_A). Stop iff
    P(Bin(r, p0) >= K - n_A) <= level with p0 = cp_upper(n_A, m, level) (for K - n_A > r that
    probability is 0: the stop is then deterministic). The rule stops exactly when n_A <= c for a
    threshold c fixed by (m, n, K, level) (the test statistic grows with n_A), and for every p_A
    P(stop and final N_A >= K) <= level: if p_A >= p0(c), P(Bin(m, p_A) <= c) <= level; otherwise
    P(R >= K - c) <= P(Bin(r, p0(c)) >= K - c) <= level.
    """
    remaining = n - m
    need = threshold - n_A  # cA draws still missing for N_A >= K
    if need > remaining:
        return True
    if need <= 0 or level <= 0:
        return False
    p0 = cp_upper(n_A, m, level)
    return float(special.bdtrc(need - 1, remaining, p0)) <= level


def allowed_sample_sizes(n_max: int, shard_size: int) -> list[int]:
    """shard_size, 2 shard_size, ... below ``n_max``, then ``n_max``: the n an ISS image may use."""
    return [*range(shard_size, n_max, shard_size), n_max]


def plugin_radius(pilot: np.ndarray, n: int, sigma: float, alpha: float) -> float:
    """CERTIFY's radius at n with the pilot frequency of cA plugged in: count round(n * pilot[cA] / n0)."""
    n0 = int(pilot.sum())
    if n0 == 0:
        return 0.0
    n_A = min(n, int(np.rint(n * int(pilot.max()) / n0)))
    pa = pA_lower(n_A, n, alpha)
    return sigma * float(special.ndtri(pa)) if pa >= 0.5 else 0.0


def iss_sample_size(pilot_counts: np.ndarray, n_max: int, shard_size: int, sigma: float, alpha: float,
                    max_radius_loss: float) -> int:
    """The smallest allowed n with plugin_radius(n_max) - plugin_radius(n) <= ``max_radius_loss``.

    ``max_radius_loss`` is in the radius's own units (l2 in [0, 1] pixel space, like ``radius_certify``).
    A pure function of the pilot counts and the settings: it never sees a main draw. When the plug-in
    predicts an abstention at n_max (radius 0) the smallest allowed n is chosen.
    """
    pilot = np.asarray(pilot_counts, dtype=np.int64)
    if not (isinstance(max_radius_loss, (int, float)) and math.isfinite(max_radius_loss)
            and max_radius_loss >= 0):
        raise ValueError(f"max_radius_loss={max_radius_loss!r}: must be a finite number >= 0")
    target = plugin_radius(pilot, n_max, sigma, alpha) - max_radius_loss
    for n in allowed_sample_sizes(n_max, shard_size):
        if plugin_radius(pilot, n, sigma, alpha) >= target:
            return n
    return n_max



# ------------------------------------------------------------------------------------- shortcut rules


@dataclass
class ImageDraws:
    """What a shortcut sees of one image: its label, the pilot counts, the main counts so far.

    ``n``: the main draws the image makes at most (a rule may lower it after the pilot); ``made``: main
    draws summed so far; ``shortcut``: the row's ``shortcut`` value (set by the rule that changed the
    draws); ``notes``: each rule's working state for this image, under the rule's ``name``.
    """

    label: int
    pilot: np.ndarray
    counts: np.ndarray
    n: int
    made: int = 0
    shortcut: str = "none"
    planned: bool = False  # the pilot was seen by every rule (main draws planned)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def top_class(self) -> int:
        """cA: the pilot's most frequent class (CERTIFY and T-CERTIFY certify it or abstain)."""
        return int(np.argmax(self.pilot))

    @property
    def top_count(self) -> int:
        """N_A so far: the main draws that landed in cA."""
        return int(self.counts[self.top_class])


class Shortcut:
    """One evaluation shortcut: the scheduler asks every rule after the pilot and at each look.

    Every answer must be a function of the counts (and the rule's settings) only, so that the Ray
    driver and a notebook loop decide identically and the draws made are those of the full run. The
    defaults change nothing: a rule overrides what it needs.
    """

    name = "none"

    def after_pilot(self, image: ImageDraws) -> bool:
        """Seen the pilot: may lower ``image.n``; True = make no main draws (the image is finished)."""
        return False

    def next_look(self, image: ImageDraws) -> int:
        """The main-draw count (> ``image.made``) at which this rule wants to look next."""
        return image.n

    def after_look(self, image: ImageDraws) -> bool:
        """Seen ``image.made`` main draws: True = stop the image now (set ``image.shortcut``)."""
        return False

    def row_fields(self, image: ImageDraws) -> dict[str, Any]:
        """Extra ``result_row`` arguments of a finished image (``level``, ``target_radius``, ...)."""
        return {}


def next_look(rules: Sequence[Shortcut], image: ImageDraws) -> int | None:
    """Ask the rules once every released draw of ``image`` is summed: None = finished, else the main-draw
    count to release draws up to. The first rule that stops the image ends the asking."""
    if not image.planned:
        image.planned = True
        if any(rule.after_pilot(image) for rule in rules):
            return None
    elif any(rule.after_look(image) for rule in rules) or image.made >= image.n:
        return None
    return min((rule.next_look(image) for rule in rules), default=image.n)


def row_fields(rules: Sequence[Shortcut], image: ImageDraws) -> dict[str, Any]:
    """Every rule's ``row_fields`` of a finished image, merged in rule order."""
    return {key: value for rule in rules for key, value in rule.row_fields(image).items()}


@dataclass(frozen=True)
class SkipMisclassified(Shortcut):
    """No main draws when cA != label: CERTIFY and T-CERTIFY then certify cA or abstain, so the image is
    never certified-correct and the table is exactly unchanged."""

    name = "skipped_misclassified"

    def after_pilot(self, image: ImageDraws) -> bool:
        if image.top_class == image.label:
            return False
        image.shortcut = self.name
        return True


@dataclass(frozen=True)
class InputSpecificSize(Shortcut):
    """ISS: n_i = ``iss_sample_size`` of the pilot counts (never sees a main draw)."""

    shard_size: int
    sigma: float
    alpha: float
    max_radius_loss: float
    name = "iss"

    def after_pilot(self, image: ImageDraws) -> bool:
        chosen = iss_sample_size(image.pilot, image.n, self.shard_size, self.sigma, self.alpha,
                                 self.max_radius_loss)
        if chosen < image.n:
            image.n, image.shortcut = chosen, self.name
        return False


@dataclass(frozen=True)
class EarlyAbstain(Shortcut):
    """Main draws in waves of ``wave`` shards; after each wave but the last, ``should_stop_early`` at the
    per-check level ``wave_level(delta, waves - 1)`` against CERTIFY's threshold at the image's n."""

    shard_size: int
    alpha: float
    delta: float
    wave: int
    rule: str = "product"
    name = "early_abstain"

    def after_pilot(self, image: ImageDraws) -> bool:
        shards = math.ceil(image.n / self.shard_size)
        waves = math.ceil(shards / self.wave)
        image.notes[self.name] = (certify_threshold(image.n, self.alpha), wave_level(self.delta, waves - 1))
        return False

    def next_look(self, image: ImageDraws) -> int:
        return min(image.n, image.made + self.wave * self.shard_size)

    def after_look(self, image: ImageDraws) -> bool:
        threshold, level = image.notes[self.name]
        if image.made >= image.n or not should_stop_early(image.top_count, image.made, image.n, threshold,
                                                          level, self.rule):
            return False
        image.shortcut = self.name
        return True


@dataclass(frozen=True)
class Sequential(Shortcut):
    """``stop_when_decided`` (``target_radius`` None) or ``target_radius``: looks after 1, 2, 4, ... shards
    and at n; the image's plan (adre_ray.smoothing.sequential) says at each look whether to stop."""

    shard_size: int
    sigma: float
    alpha: float
    target_radius: float | None = None
    decide_grid: tuple[float, ...] | None = None
    decide_delta: float = 1e-4
    name = "sequential"

    def after_pilot(self, image: ImageDraws) -> bool:
        if self.target_radius is not None:
            plan = target_plan(image.n, self.shard_size, self.sigma, self.alpha, self.target_radius)
        else:
            plan = decide_plan(image.n, self.shard_size, self.sigma, self.alpha, self.decide_grid,
                               self.decide_delta)
        image.notes["plan"] = plan
        return False

    def next_look(self, image: ImageDraws) -> int:
        return next(m for m in image.notes["plan"].looks if m > image.made)

    def after_look(self, image: ImageDraws) -> bool:
        verdict = image.notes["plan"].check(image.top_count, image.made)
        if not verdict.stop:
            return False
        image.notes["verdict"] = verdict
        if image.made < image.n:
            image.shortcut = ("early_abstain" if verdict.abstain else
                              "decided" if self.target_radius is None else "target_radius")
        return True

    def row_fields(self, image: ImageDraws) -> dict[str, Any]:
        """The stopping look's level and decision; an image skipped after its pilot gets decision
        ``abstain`` at a target radius (nothing was tested)."""
        verdict = image.notes.get("verdict")
        if verdict is None:
            return {} if self.target_radius is None else {"target_radius": self.target_radius,
                                                          "decision": "abstain"}
        return {"level": verdict.level, "target_radius": self.target_radius, "decision": verdict.decision}


__all__ = [
    "ABSTAINING_SHORTCUTS", "EARLY_ABSTAIN_RULES", "N_POLICIES", "SHORTCUTS", "EarlyAbstain", "ImageDraws",
    "InputSpecificSize", "Sequential", "Shortcut", "SkipMisclassified", "allowed_sample_sizes",
    "certify_threshold", "iss_sample_size", "next_look", "plugin_radius", "row_fields", "should_stop_early",
    "should_stop_early_cp", "wave_level",
]
