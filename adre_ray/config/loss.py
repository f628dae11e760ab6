"""The training config's ``loss`` section: a loss's name and the parameters the losses declare.

The keys are not listed here: they are ``name`` and every parameter of every loss the training package
declares (``adre_ray.training.loss_params.declared_params``: the built-in losses, then any registered
one), each with the rule, default and meaning its loss's ``LossParams`` gives it. A loss with a new
parameter therefore needs no edit of this package: ``--set loss.<parameter>=...``, YAML, ``--help`` and
the MLflow params read it from the loss. Only the defaults of a training run differ from a library call's
and are set here (:data:`TRAINING_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic
from pydantic_core import PydanticUndefined

from adre_ray.config.values import Key
from adre_ray.training.loss_params import check_knobs, declared_knobs, declared_params, training_params

TRAINING_DEFAULTS = {"name": "adre_reg", "sigma": 0.25, "k": 8, "lam": 0.2}
"""The seed paper's CIFAR-10 ADRE_REG run (a library call's defaults: k 1, lam 0, sigma required)."""

PREFIX = "loss."


class LossSection(pydantic.BaseModel):
    """The training objective: the loss ``name`` and the parameters of every declared loss (attributes:
    ``cfg.loss.lam``). Each value is checked by the rule of the loss declaring it, whatever loss is
    chosen, then the chosen loss's own training rules (an attack needs epsilon > 0); the first refusal
    is ``ValueError("loss.<field>=<value!r>: <why>")``."""

    model_config = pydantic.ConfigDict(extra="allow")

    name: str = TRAINING_DEFAULTS["name"]

    @classmethod
    def config_keys(cls) -> list[Key]:
        """Every key of the section with its type, default and meaning (``--help``, ``--set``, YAML)."""
        keys = [Key("name", str, TRAINING_DEFAULTS["name"], "loss: " + " | ".join(declared_params()))]
        for knob, info in declared_knobs().items():
            default = TRAINING_DEFAULTS.get(knob, info.get_default(call_default_factory=True))
            keys.append(Key(knob, info.annotation, None if default is PydanticUndefined else default,
                            info.description or ""))
        return keys

    @pydantic.model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        """The defaults filled in, every value checked (see the class docstring)."""
        if not isinstance(data, Mapping):
            return data  # pydantic refuses it: the section must be a mapping
        known = {key.name: key.default for key in cls.config_keys()}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"{PREFIX}{key}={value!r}: unknown config key (known in this section: "
                                 f"{', '.join(sorted(known))})")
        values = {key: default for key, default in known.items() if default is not None} | dict(data)
        checked = check_knobs({key: value for key, value in values.items() if key != "name"}, PREFIX)
        training_params(values["name"], checked, PREFIX)
        return {"name": values["name"], **checked}
