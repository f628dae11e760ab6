"""Building a registered loss by name: from keyword knobs (library calls) or a config's ``loss`` section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from adre_ray.training.checks import checked
from adre_ray.training.losses.base import LOSS_REGISTRY, LossFn, LossParams, parse_loss_params


def loss_names() -> tuple[str, ...]:
    """The registered losses' names, in registration order (queried live: a plug-in loss counts)."""
    return tuple(LOSS_REGISTRY)


def loss_class(name: str, field: str = "loss") -> type[LossFn]:
    """The loss registered as ``name``, or ``ValueError("<field>=<name!r>: must be one of ...")``."""
    if name not in LOSS_REGISTRY:
        raise ValueError(f"{field}={name!r}: must be one of {', '.join(LOSS_REGISTRY)}")
    return LOSS_REGISTRY[name]


def _declared_rule(knob: str) -> Any:
    """The rule type of parameter ``knob`` in the first registered loss declaring it (None: no loss does)."""
    for cls in LOSS_REGISTRY.values():
        declared = cls.Params.model_fields.get(knob)
        if declared is not None:
            if not declared.metadata:
                return declared.annotation
            return Annotated[(declared.annotation, *declared.metadata)]
    return None


def check_knobs(knobs: Mapping[str, Any], prefix: str = "") -> None:
    """Check every knob by the rule of the loss that declares it, whatever loss is built, so a bad value is
    refused the same way for every method; a knob no registered loss declares is a TypeError."""
    for knob, value in knobs.items():
        rule = _declared_rule(knob)
        if rule is None:
            raise TypeError(f"{prefix}{knob}={value!r}: no registered loss has this parameter "
                            f"(losses: {', '.join(LOSS_REGISTRY)})")
        checked(prefix + knob, value, rule)


def build_loss(name: str, **knobs: Any) -> LossFn:
    """The loss ``name`` with its knobs: ``build_loss("adre_reg", sigma=0.25, k=4, lam=0.5)``.

    Every knob is validated whatever the loss (ValueError naming the field and value); knobs the loss
    does not declare are then ignored (lam and per_loss by gaussian and smoothadv, epsilon, steps and
    warmup_epochs by gaussian and adre_reg).
    """
    cls = loss_class(name)
    check_knobs(knobs)
    return cls(**{knob: value for knob, value in knobs.items() if knob in cls.Params.model_fields})


def check_loss_config(section: Mapping[str, Any], prefix: str = "loss.") -> LossParams:
    """The parameters of the loss a training config's section names, checked as a training run needs
    them: ``name`` registered, every knob by its rule, then the loss's own training rules (an attack
    needs epsilon > 0). Messages name ``<prefix><field>``."""
    cls = loss_class(section["name"], f"{prefix}name")
    knobs = {key: value for key, value in section.items() if key != "name"}
    check_knobs(knobs, prefix)
    params = parse_loss_params(cls.Params, {key: value for key, value in knobs.items()
                                            if key in cls.Params.model_fields}, prefix)
    params.check_training_use(section["name"], prefix)
    return params


def loss_from_config(section: Any) -> LossFn:
    """The loss a training config's ``loss`` section names, built the one way every loss is: its class
    gets the section's values of the parameters its ``Params`` declares (defaults for the others)."""
    cls = loss_class(section.name, "loss.name")
    return cls(**{key: getattr(section, key) for key in cls.Params.model_fields if hasattr(section, key)})


__all__ = ["build_loss", "check_knobs", "check_loss_config", "loss_class", "loss_from_config", "loss_names"]
