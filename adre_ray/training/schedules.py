"""Optimizer and per-iteration learning-rate schedules (step decay as in the papers, cosine with warm-up)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from adre_ray.training.checks import (
    AtLeastOne,
    AtLeastZero,
    DecayFactor,
    Momentum,
    NonNegativeFloat,
    PositiveFloat,
    checked,
    one_of,
    require,
)
from adre_ray.training.names import SCHEDULES

"""Learning-rate schedules by name (``schedule.name``)."""


def lr_factor(
    iteration: int, name: str, *, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
    step_size: int = 50, gamma: float = 0.1,
) -> float:
    """Multiplier of the base lr after ``iteration`` optimizer steps (0-based).

    Linear warm-up over the first ``W = warmup_epochs * steps_per_epoch`` iterations: (i + 1) / W.
    Then ``step``: gamma ** (epoch // step_size), epoch = i // steps_per_epoch (the papers' /10 every 50
    of 150 epochs); ``cosine``: (1 + cos(pi * (i - W) / (T - W))) / 2, T = epochs * steps_per_epoch,
    reaching 0 after the last iteration.
    """
    warmup_iters = warmup_epochs * steps_per_epoch
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    if name == "step":
        return gamma ** (iteration // steps_per_epoch // step_size)
    total = epochs * steps_per_epoch
    progress = min(1.0, (iteration - warmup_iters) / max(1, total - warmup_iters))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    step_size: int = 50,
    gamma: float = 0.1,
) -> LambdaLR:
    """A ``LambdaLR`` with factor ``lr_factor(i, ...)``, to be stepped once per optimizer step."""
    checked("schedule", name, one_of(SCHEDULES))
    checked("epochs", epochs, AtLeastOne)
    checked("steps_per_epoch", steps_per_epoch, AtLeastOne)
    checked("warmup_epochs", warmup_epochs, AtLeastZero)
    require(warmup_epochs < epochs, "warmup_epochs", warmup_epochs, f"must be < epochs={epochs}")
    checked("step_size", step_size, AtLeastOne)
    checked("gamma", gamma, DecayFactor)
    kwargs = dict(epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs,
                  step_size=step_size, gamma=gamma)
    return LambdaLR(optimizer, lambda iteration: lr_factor(iteration, name, **kwargs))


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    *,
    decay_norm_and_bias: bool = False,
) -> torch.optim.SGD:
    """SGD; weight decay applies to weight matrices/kernels only (params with ndim >= 2).

    Biases and normalisation parameters (ndim <= 1) get no weight decay unless ``decay_norm_and_bias``
    (the original papers decay every parameter; set it to reproduce them exactly).
    """
    checked("lr", lr, PositiveFloat)
    checked("momentum", momentum, Momentum)
    checked("weight_decay", weight_decay, NonNegativeFloat)
    require(not nesterov or momentum > 0, "nesterov", nesterov, "needs momentum > 0")
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [group for group in groups if group["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
