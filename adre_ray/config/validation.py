"""The certified-validation section shared by the training config and the search space file."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from adre_ray.checks import check, is_number
from adre_ray.config.base import config_dataclass, config_field
from adre_ray.config.fields import Alpha, Count, Draws, Seed, core_check
from adre_ray.smoothing.params import TCERTIFY_MODES

VALIDATION_SPLITS = ("holdout", "test")


def _check_radii(value: tuple[float, ...], field: str) -> None:
    check(len(value) > 0, field, value, "must hold at least one radius")
    for r in value:
        check(is_number(r) and math.isfinite(r) and r >= 0, field, value,
              f"value {r!r} is not a finite number >= 0")


Radii = Annotated[tuple[float, ...], core_check(_check_radii)]


@config_dataclass
class ValidationSection:
    """Approximate certified accuracy at the end of training (adre_ray.training.certified_validation)."""

    enabled: bool = config_field(False, "run it after the final epoch and report approx_* metrics")
    split: Literal[VALIDATION_SPLITS] = config_field(
        "holdout", "holdout (train images outside data.train_subset) | test (then the search has seen the "
                   "test set)")
    size: Count = config_field(500, "validation images (class-balanced, seeded by seed)")
    n0: Draws = config_field(100, "pilot draws per image")
    n: Draws = config_field(1000, "estimation draws per image (small n => conservative, lower estimate)")
    alpha: Alpha = config_field(0.001, "failure probability of each certificate")
    radius: Radii = config_field((0.25, 0.5), "radii r of approx_cert_acc_at_<r> / "
                                              "approx_tcert_acc_at_<r>")
    seed: Seed = config_field(0, "choice of the images and the noise")
    batch_size: Count = config_field(1000, "noisy images per forward pass")
    mode: Literal[TCERTIFY_MODES] = config_field("pilot", "T-CERTIFY's choice of the alpha split: pilot | "
                                                          "bonferroni | paper")

    def validate(self, prefix: str = "validation.", data: Any = None) -> None:
        """With ``data`` (the train config's data section): ``holdout`` needs images to hold out
        (``data.train_subset`` set). Each field's own constraint is declared on it."""
        if data is not None and self.enabled and self.split == "holdout":
            check(data.train_subset is not None, f"{prefix}split", self.split,
                  "holds out the train images outside data.train_subset, but data.train_subset is null "
                  "(all images are trained on): set data.train_subset or validation.split=test")
