"""The training losses' parameters and the registry of losses by name, importable without torch.

A loss's parameters are a :class:`LossParams` subclass (pydantic fields with the rules of
``adre_ray.training.checks`` and a ``description``, the text ``--help`` shows); a training config's
``loss`` section holds ``name`` and the parameters of every registered loss, each checked by the rule of
the loss declaring it (``adre_ray.config.loss.LossSection``). The built-in losses' parameters are declared
here so that the configs and ``--help`` read them without importing torch; a loss defined elsewhere (a
plug-in) declares its ``Params`` beside its code and :func:`~adre_ray.training.losses.base.register_loss`
adds it to :data:`LOSS_REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import Field
from pydantic.fields import FieldInfo

from adre_ray.training.checks import (
    AtLeastOne,
    AtLeastZero,
    NonNegativeFloat,
    Sigma,
    UnitFraction,
    checked,
    error_message,
    one_of,
)
from adre_ray.training.names import BUILT_IN_LOSSES, PER_LOSSES


class LossParams(pydantic.BaseModel):
    """Parameters every loss takes: noise std ``sigma`` in (0, 100], ``k`` >= 1 noise draws per example,
    ``label_smoothing`` in [0, 1) of the per-draw cross-entropy. A loss adds its own by subclassing."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    sigma: Sigma = Field(description="noise std of training and of the per-epoch noisy evaluation")
    k: AtLeastOne = Field(1, description="noise draws per training example")
    label_smoothing: UnitFraction = Field(
        0.0, description="label smoothing of the cross-entropy terms, in [0, 1)")

    def check_training_use(self, name: str, prefix: str) -> None:
        """Rules a training run needs beyond the value rules (none here; an attack needs epsilon > 0)."""


class AdreRegParams(LossParams):
    """ADRE_REG's own parameters: ``lam`` >= 0, the ADRE term's weight; ``per_loss`` (:data:`PER_LOSSES`)."""

    lam: NonNegativeFloat = Field(
        0.0, description="lambda, weight of the ADRE term (0 = Gaussian augmentation with k draws)")
    per_loss: one_of(PER_LOSSES) = Field(  # type: ignore[valid-type]
        "mean", description="mean (CE averaged over the k draws) | single (one random draw)")


def warmup_epsilon(epsilon: float, epoch: int, warmup_epochs: int) -> float:
    """SmoothAdv's attack-radius warm-up: ``epsilon * min(1, (epoch + 1) / warmup_epochs)`` (0-based epoch).

    ``warmup_epochs = 0`` means no warm-up (the full epsilon from epoch 0).
    """
    checked("epoch", epoch, AtLeastZero)
    if warmup_epochs <= 0:
        return float(epsilon)
    return float(epsilon) * min(1.0, (epoch + 1) / warmup_epochs)


class PgdParams(LossParams):
    """The l2 PGD attack's parameters: radius ``epsilon`` >= 0, ``steps`` M >= 1, and ``warmup_epochs``
    over which the radius ramps up (0 = none)."""

    epsilon: NonNegativeFloat = Field(0.0, description="l2 radius of the PGD attack (smoothadv, adre_adv)")
    steps: AtLeastOne = Field(1, description="PGD steps M")
    warmup_epochs: AtLeastZero = Field(
        0, description="epochs over which epsilon ramps up linearly (SmoothAdv)")

    def epsilon_at(self, epoch: int) -> float:
        """Attack radius in ``epoch`` (0-based): ``epsilon * min(1, (epoch + 1) / warmup_epochs)``."""
        return warmup_epsilon(self.epsilon, epoch, self.warmup_epochs)

    def check_training_use(self, name: str, prefix: str) -> None:
        """A training run of an attack loss needs a radius: epsilon > 0."""
        if not self.epsilon > 0:
            raise ValueError(f"{prefix}epsilon={self.epsilon!r}: must be > 0 for {prefix}name={name!r}")


class AdreAdvParams(AdreRegParams, PgdParams):
    """ADRE_REG's parameters (lam, per_loss) and the attack's (epsilon, steps, warmup_epochs)."""


BUILT_IN_PARAMS: dict[str, type[LossParams]] = dict(zip(
    BUILT_IN_LOSSES, (LossParams, AdreRegParams, PgdParams, AdreAdvParams), strict=True))
"""The built-in losses' parameters by loss name (their classes, in ``losses/<name>.py``, import torch)."""

LOSS_REGISTRY: dict[str, Any] = {}
"""Loss classes (``LossFn`` subclasses) by name (``loss.name`` of a training config), in registration
order; filled by ``register_loss`` when a loss module is imported."""


def declared_params() -> dict[str, type[LossParams]]:
    """Every loss a config may name -> its parameters: the built-in ones (without importing their torch
    code), then the registered ones (queried live: a plug-in loss counts once registered)."""
    return {**BUILT_IN_PARAMS, **{name: cls.Params for name, cls in LOSS_REGISTRY.items()}}


P = TypeVar("P", bound=LossParams)


def parse_loss_params(cls: type[P], values: dict[str, Any], prefix: str = "") -> P:
    """``cls(**values)``, or ``ValueError("<prefix><field>=<value!r>: <requirement>")``."""
    try:
        return cls.model_validate(values)
    except pydantic.ValidationError as error:
        raise ValueError(error_message(error, prefix)) from None


def declared_knobs() -> dict[str, FieldInfo]:
    """Every parameter a declared loss takes -> its field (rule, default, description), as the first
    loss declaring it has it, in the order of :func:`declared_params`."""
    knobs: dict[str, FieldInfo] = {}
    for params in declared_params().values():
        for knob, info in params.model_fields.items():
            knobs.setdefault(knob, info)
    return knobs


def knob_rule(info: FieldInfo) -> Any:
    """The annotated type (rules included) a parameter's value is checked by."""
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def params_class(name: Any, field: str = "loss") -> type[LossParams]:
    """The parameters of the loss ``name``, else ``ValueError("<field>=<name!r>: must be one of ...")``."""
    declared = declared_params()
    if not isinstance(name, str) or name not in declared:
        raise ValueError(f"{field}={name!r}: must be one of {', '.join(declared)}")
    return declared[name]


def check_knobs(knobs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check every knob by the rule of the loss that declares it, whatever loss is built, so a bad value is
    refused the same way for every method; a knob no declared loss takes is a TypeError. Returns the
    checked values (an integral number given for a float parameter comes back as a float)."""
    declared = declared_knobs()
    out = {}
    for knob, value in knobs.items():
        if knob not in declared:
            raise TypeError(f"{prefix}{knob}={value!r}: no registered loss has this parameter "
                            f"(losses: {', '.join(declared_params())})")
        out[knob] = checked(prefix + knob, value, knob_rule(declared[knob]))
    return out


def check_loss_config(section: Mapping[str, Any], prefix: str = "loss.") -> LossParams:
    """The parameters of the loss a training config's section names, checked as a training run needs
    them: ``name`` declared, every knob by its rule, then the loss's own training rules (an attack
    needs epsilon > 0). Messages name ``<prefix><field>``."""
    params_class(section["name"], f"{prefix}name")  # an unknown name is named before a bad knob
    knobs = check_knobs({key: value for key, value in section.items() if key != "name"}, prefix)
    return training_params(section["name"], knobs, prefix)


def training_params(name: Any, knobs: Mapping[str, Any], prefix: str = "loss.") -> LossParams:
    """The parameters of loss ``name`` from ``knobs`` already checked by :func:`check_knobs` (the loss's
    own fields taken, the others ignored), then the loss's training rules."""
    cls = params_class(name, f"{prefix}name")
    params = parse_loss_params(cls, {key: value for key, value in knobs.items() if key in cls.model_fields},
                               prefix)
    params.check_training_use(name, prefix)
    return params


__all__ = ["BUILT_IN_PARAMS", "LOSS_REGISTRY", "AdreAdvParams", "AdreRegParams", "LossParams", "PgdParams",
           "check_knobs", "check_loss_config", "declared_knobs", "declared_params", "knob_rule",
           "params_class", "parse_loss_params", "training_params", "warmup_epsilon"]
