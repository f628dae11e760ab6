"""Training losses, one module each, registered by name: ``build_loss("adre_reg", sigma=0.25, k=4, lam=0.5)``.

Every loss is called as ``loss_fn(model, x, y, epoch) -> LossOutput``. A new loss is one module: a
``LossParams`` subclass with its parameters and a ``LossFn`` subclass decorated with ``register_loss``
(see docs/training-methods.md); importing it makes ``loss.name`` accept it.
"""

from __future__ import annotations

from adre_ray.training.losses.base import (
    LOSS_REGISTRY,
    LossFn,
    LossOutput,
    LossParams,
    register_loss,
    warmup_epsilon,
)
from adre_ray.training.losses.build import (
    build_loss,
    check_loss_config,
    loss_class,
    loss_from_config,
    loss_names,
)

# importing a loss registers it: the built-in losses, in this order
# isort: off
from adre_ray.training.losses.gaussian import GaussianLoss
from adre_ray.training.losses.adre_reg import PER_LOSSES, AdreRegLoss
from adre_ray.training.losses.smoothadv import SmoothAdvLoss
from adre_ray.training.losses.adre_adv import AdreAdvLoss
# isort: on

__all__ = [
    "LOSS_REGISTRY", "PER_LOSSES", "AdreAdvLoss", "AdreRegLoss", "GaussianLoss", "LossFn", "LossOutput",
    "LossParams", "SmoothAdvLoss", "build_loss", "check_loss_config", "loss_class", "loss_from_config",
    "loss_names", "register_loss", "warmup_epsilon",
]
