"""The modules a training worker runs: DDP first, ``torch.compile`` after, and a separate evaluation module.

``torch.compile`` applied before DDP wrapping hides the model's layers from DDP, so gradient buckets
cannot be all-reduced while the backward pass is still running; compiling the DDP-wrapped module lets
dynamo's DDP optimizer split the graph at bucket boundaries and keeps the overlap (PyTorch's "DDP and
torch.compile" notes). Evaluation (no grad, eval mode, padded to one batch shape) gets its own compiled
view of the local module, and the attack runs the local module outside DDP (it takes gradients with
respect to the input only, which DDP's reducer must never see).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

_LOCAL_COMPILED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def training_modules(model: nn.Module, wrap_ddp: Callable[[nn.Module], nn.Module], *, compile: bool,
                     backend: str = "inductor") -> tuple[nn.Module, nn.Module]:
    """``(train_module, eval_module)`` for ``model``: ``compile(wrap_ddp(model))`` and ``compile(model)``
    (each uncompiled when ``compile`` is false). ``wrap_ddp`` is e.g. ``ray.train.torch.prepare_model``
    (moves the model to the worker's device and wraps it in DDP when there are several workers)."""
    wrapped = wrap_ddp(model)
    local = wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped
    if not compile:
        return wrapped, local
    train_module = torch.compile(wrapped, backend=backend)
    eval_module = torch.compile(local, backend=backend, dynamic=False)
    _LOCAL_COMPILED[train_module] = eval_module  # the attack's module (local_module)
    return train_module, eval_module  # type: ignore[return-value]


def local_module(model: nn.Module) -> nn.Module:
    """The module to run outside DDP's gradient synchronisation: ``model.module`` of a DDP model; for a
    compiled DDP model from ``training_modules``, the compiled local module; otherwise ``model``."""
    if isinstance(model, DistributedDataParallel):
        return model.module
    if model in _LOCAL_COMPILED:
        return _LOCAL_COMPILED[model]
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, DistributedDataParallel):
        return inner.module
    return model


__all__ = ["local_module", "training_modules"]
