"""Building a registered loss by name: from keyword knobs (library calls) or a config's ``loss`` section."""

from __future__ import annotations

from typing import Any

from adre_ray.training.loss_params import LOSS_REGISTRY, check_knobs, check_loss_config
from adre_ray.training.losses.base import LossFn


def loss_names() -> tuple[str, ...]:
    """The registered losses' names, in registration order (queried live: a plug-in loss counts)."""
    return tuple(LOSS_REGISTRY)


def loss_class(name: str, field: str = "loss") -> type[LossFn]:
    """The loss registered as ``name``, or ``ValueError("<field>=<name!r>: must be one of ...")``."""
    if name not in LOSS_REGISTRY:
        raise ValueError(f"{field}={name!r}: must be one of {', '.join(LOSS_REGISTRY)}")
    return LOSS_REGISTRY[name]


def build_loss(name: str, **knobs: Any) -> LossFn:
    """The loss ``name`` with its knobs: ``build_loss("adre_reg", sigma=0.25, k=4, lam=0.5)``.

    Every knob is validated whatever the loss (ValueError naming the field and value); knobs the loss
    does not declare are then ignored (lam and per_loss by gaussian and smoothadv, epsilon, steps and
    warmup_epochs by gaussian and adre_reg).
    """
    cls = loss_class(name)
    check_knobs(knobs)
    return cls(**{knob: value for knob, value in knobs.items() if knob in cls.Params.model_fields})


def loss_from_config(section: Any) -> LossFn:
    """The loss a training config's ``loss`` section names, built the one way every loss is: its class
    gets the section's values of the parameters its ``Params`` declares (defaults for the others)."""
    cls = loss_class(section.name, "loss.name")
    return cls(**{key: getattr(section, key) for key in cls.Params.model_fields if hasattr(section, key)})


__all__ = ["build_loss", "check_knobs", "check_loss_config", "loss_class", "loss_from_config", "loss_names"]
