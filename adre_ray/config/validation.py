"""The certified-validation section shared by the training config and the search space file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adre_ray.config.base import check, check_choice, check_int_at_least, config_field
from adre_ray.smoothing.params import TCERTIFY_MODES, check_alpha, check_draws

VALIDATION_SPLITS = ("holdout", "test")


@dataclass
class ValidationSection:
    """Approximate certified accuracy at the end of training (adre_ray.training.certified_validation)."""

    enabled: bool = config_field(False, "run it after the final epoch and report approx_* metrics")
    split: str = config_field("holdout", "holdout (train images outside data.train_subset) | test (then the "
                                         "search has seen the test set)")
    size: int = config_field(500, "validation images (class-balanced, seeded by seed)")
    n0: int = config_field(100, "pilot draws per image")
    n: int = config_field(1000, "estimation draws per image (small n => conservative, lower estimate)")
    alpha: float = config_field(0.001, "failure probability of each certificate")
    radius: tuple[float, ...] = config_field((0.25, 0.5), "radii r of approx_cert_acc_at_<r> / "
                                                  "approx_tcert_acc_at_<r>")
    seed: int = config_field(0, "choice of the images and the noise")
    batch_size: int = config_field(1000, "noisy images per forward pass")
    mode: str = config_field("pilot", "T-CERTIFY's choice of the alpha split: pilot | bonferroni | paper")

    def validate(self, prefix: str = "validation.", data: Any = None) -> None:
        """Field checks; with ``data`` (the train config's data section) also that ``holdout`` has images
        to hold out (``data.train_subset`` set)."""
        check(isinstance(self.enabled, bool), f"{prefix}enabled", self.enabled, "must be true or false")
        check_choice(f"{prefix}split", self.split, VALIDATION_SPLITS)
        if data is not None and self.enabled and self.split == "holdout":
            check(data.train_subset is not None, f"{prefix}split", self.split,
                  "holds out the train images outside data.train_subset, but data.train_subset is null "
                  "(all images are trained on): set data.train_subset or validation.split=test")
        check_int_at_least(f"{prefix}size", self.size, 1)
        check_draws(self.n0, f"{prefix}n0")
        check_draws(self.n, f"{prefix}n")
        check_alpha(self.alpha, f"{prefix}alpha")
        check(len(self.radius) > 0, f"{prefix}radius", self.radius, "must hold at least one radius")
        for r in self.radius:
            check(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0,
                  f"{prefix}radius", self.radius, f"value {r!r} is not a finite number >= 0")
        check_int_at_least(f"{prefix}seed", self.seed, 0)
        check_int_at_least(f"{prefix}batch_size", self.batch_size, 1)
        check_choice(f"{prefix}mode", self.mode, TCERTIFY_MODES)
