"""The one interface of a training loss, and the registry that finds a loss by name.

A loss is one module: a :class:`LossParams` subclass declaring its parameters (pydantic fields with the
rules of ``adre_ray.training.checks``; the base class and the built-in losses' parameters live,
torch-free, in ``adre_ray.training.loss_params``) and a :class:`LossFn` subclass, decorated with
:func:`register_loss`, whose ``__call__(model, x, y, epoch) -> LossOutput`` is what the trainer calls.
Registering it is all a training config needs: ``loss.name`` accepts it and ``loss.<parameter>`` keys
its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch.nn.functional import cross_entropy

from adre_ray.training.loss_params import (
    LOSS_REGISTRY,
    LossParams,
    parse_loss_params,
    warmup_epsilon,
)
from adre_ray.training.smoothed_score import draw_noise, log_smoothed_score, noisy_logits, runner_up


@dataclass
class LossOutput:
    """One training step's loss and its detached parts (tensors stay on the device: no host sync).

    loss: scalar with grad, to call ``.backward()`` on. l_per: mean over the batch of the per-example
    classification loss. l_adre: mean over the batch of ``-log G^{yhat}`` (0 for gaussian / smoothadv).
    correct: number of examples whose first noisy draw is classified as y (train accuracy under noise;
    at x~ for the adversarial losses). batch_size: B. epsilon: the attack radius used this step (0 when
    there was no attack).
    """

    loss: torch.Tensor
    l_per: torch.Tensor
    l_adre: torch.Tensor
    correct: torch.Tensor
    batch_size: int
    epsilon: float = 0.0


class LossFn:
    """Base class: ``Params`` declares the parameters (each one an attribute after construction); the
    noise draws and the per-draw cross-entropy every loss uses live here."""

    name: ClassVar[str] = "base"
    Params: ClassVar[type[LossParams]] = LossParams

    def __init__(self, **params: Any) -> None:
        self.params = parse_loss_params(type(self).Params, params)
        for key, value in self.params:
            setattr(self, key, value)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if key != "params")
        return f"{type(self).__name__}({fields})"

    def draw_noise(self, x: torch.Tensor) -> torch.Tensor:
        """k Gaussian draws per example, ``sigma * N(0, I)``, shape (B, k, C, H, W)."""
        return draw_noise(x, self.k, self.sigma)

    def per_draw_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``CE(f(x_i + d_ij), y_i)`` of shape (B, k), in float32, with label smoothing."""
        batch, k, classes = logits.shape
        ce = cross_entropy(logits.float().reshape(batch * k, classes), y.repeat_interleave(k),
                             reduction="none", label_smoothing=self.label_smoothing)
        return ce.view(batch, k)


def first_draw_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many examples have ``argmax f(x_i + d_i1) == y_i`` (detached int64 scalar on the device)."""
    return (logits[:, 0].detach().argmax(dim=1) == y).sum()


def adre_reg_loss(
    logits: torch.Tensor, y: torch.Tensor, per_draw_ce: torch.Tensor, *, lam: float, per_loss: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, mean l_per, mean l_adre)`` of ADRE_REG: loss = mean_i (l_per_i - lam * l_adre_i).

    l_per_i = mean_j CE(f(x_i + d_ij), y_i) (``per_loss="single"``: one uniformly random j per example);
    log G_i = logsumexp_j log_softmax(f(x_i + d_ij)) - log k; yhat_i = argmax_{c != y_i} G_i^c (no
    gradient through the choice); l_adre_i = -log G_i^{yhat_i}.
    """
    batch, k = per_draw_ce.shape
    if per_loss == "single" and k > 1:
        pick = torch.randint(k, (batch, 1), device=per_draw_ce.device)
        l_per = per_draw_ce.gather(1, pick).squeeze(1)
    else:
        l_per = per_draw_ce.mean(dim=1)
    log_G = log_smoothed_score(logits if lam != 0.0 else logits.detach())
    yhat = runner_up(log_G, y)
    l_adre = -log_G.gather(1, yhat.view(-1, 1)).squeeze(1)
    loss = (l_per - lam * l_adre).mean() if lam != 0.0 else l_per.mean()
    return loss, l_per.detach().mean(), l_adre.detach().mean()


L = TypeVar("L", bound=type[LossFn])

def register_loss(cls: L) -> L:
    """Class decorator: make the loss ``cls`` buildable by ``cls.name`` (``build_loss``, ``loss.name``).

    Registering another class under a taken name is refused (re-registering the same class, e.g. after
    a module reload, replaces it)."""
    if not (isinstance(cls, type) and issubclass(cls, LossFn)) or cls.name == LossFn.name:
        raise TypeError(f"register_loss({cls!r}): needs a LossFn subclass with its own name")
    taken = LOSS_REGISTRY.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"loss name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    LOSS_REGISTRY[cls.name] = cls
    return cls


__all__ = ["LOSS_REGISTRY", "LossFn", "LossOutput", "LossParams", "adre_reg_loss", "first_draw_correct",
           "noisy_logits", "parse_loss_params", "register_loss", "warmup_epsilon"]
