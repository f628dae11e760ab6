"""Training losses, one module each, built by name: ``build_loss("adre_reg", sigma=0.25, k=4, lam=0.5)``.

Every loss is called as ``loss_fn(model, x, y, epoch) -> LossOutput``; see docs/training-methods.md.
"""

from __future__ import annotations

import inspect

from adre_ray.config.base import (
    LOSSES,
    check,
    check_choice,
    check_int_at_least,
    check_nonnegative,
    check_positive,
)
from adre_ray.training.losses.adre_adv import AdreAdvLoss
from adre_ray.training.losses.adre_reg import PER_LOSSES, AdreRegLoss
from adre_ray.training.losses.base import LossFn, LossOutput, warmup_epsilon
from adre_ray.training.losses.gaussian import GaussianLoss
from adre_ray.training.losses.smoothadv import SmoothAdvLoss

LOSS_REGISTRY: dict[str, type[LossFn]] = {
    "gaussian": GaussianLoss,
    "adre_reg": AdreRegLoss,
    "smoothadv": SmoothAdvLoss,
    "adre_adv": AdreAdvLoss,
}
"""Loss classes by config name (the keys are ``adre_ray.config.LOSSES``)."""


def build_loss(
    name: str,
    *,
    sigma: float,
    k: int = 1,
    lam: float = 0.0,
    per_loss: str = "mean",
    epsilon: float = 0.0,
    steps: int = 1,
    warmup_epochs: int = 0,
    label_smoothing: float = 0.0,
) -> LossFn:
    """The loss ``name`` (one of gaussian, adre_reg, smoothadv, adre_adv) with its knobs.

    Every knob is validated whatever the loss (ValueError naming the field and value), so a config is
    rejected the same way for every method. Knobs a method does not use are ignored: lam and per_loss
    by gaussian and smoothadv (smoothadv is adre_adv at lam = 0), epsilon, steps and warmup_epochs by
    gaussian and adre_reg.
    """
    check_choice("loss", name, LOSSES)
    check_positive("sigma", sigma)
    check_int_at_least("k", k, 1)
    check_nonnegative("lam", lam)
    check_choice("per_loss", per_loss, PER_LOSSES)
    check_nonnegative("epsilon", epsilon)
    check_int_at_least("steps", steps, 1)
    check_int_at_least("warmup_epochs", warmup_epochs, 0)
    check_nonnegative("label_smoothing", label_smoothing)
    check(label_smoothing < 1, "label_smoothing", label_smoothing, "must be < 1")
    knobs = dict(sigma=sigma, k=k, lam=lam, per_loss=per_loss, epsilon=epsilon, steps=steps,
                 warmup_epochs=warmup_epochs, label_smoothing=label_smoothing)
    cls = LOSS_REGISTRY[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in knobs.items() if key in accepted})


__all__ = [
    "LOSS_REGISTRY", "AdreAdvLoss", "AdreRegLoss", "GaussianLoss", "LossFn", "LossOutput", "SmoothAdvLoss",
    "build_loss", "warmup_epsilon",
]
