"""Model registry: ``build_model(name, num_classes, dataset)`` -> ``NormalizeLayer`` + network.

A factory registered with ``@register_model("name")`` takes ``(num_classes, dataset)`` and returns the
bare network (normalized inputs in, logits out); ``build_model`` wraps it in a :class:`NormalizedModel`
with the dataset's channel statistics, so every built model takes [0, 1] pixels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from adre_ray.data.info import dataset_info
from adre_ray.models.normalize import NormalizedModel, NormalizeLayer
from adre_ray.models.precision import fp32_logits

ModelFactory = Callable[[int, str], nn.Module]
"""``factory(num_classes, dataset) -> nn.Module`` producing the bare (un-normalized-input) network."""

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(num_classes, dataset)`` under ``name`` (names are unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: must be a non-empty string")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model={name!r}: already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


BUILTIN_MODEL_MODULES = ("cifar_resnet", "small_cnn", "torchvision_models")
"""Modules whose import registers the built-in models (cifar_resnet20/110, small_cnn, resnet50)."""


def _registry() -> dict[str, ModelFactory]:
    """The registry, the built-in models registered first (their modules are imported on first use)."""
    for module in BUILTIN_MODEL_MODULES:
        importlib.import_module(f"adre_ray.models.{module}")
    return _REGISTRY


def available_models() -> tuple[str, ...]:
    """Every registered name, now: the built-ins and any model registered since."""
    return tuple(_registry())


def check_model_name(name: str) -> None:
    """``ValueError`` naming ``name`` and listing the known models unless it is registered."""
    registry = _registry()
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"model={name!r}: unknown model (known: {', '.join(registry)})")


def build_model(name: str, num_classes: int, dataset: str) -> NormalizedModel:
    """A freshly initialized ``name`` for ``num_classes`` classes, taking [0, 1] pixels of ``dataset``.

    Returns ``nn.Sequential(NormalizeLayer(mean, std), net)`` with ``dataset``'s channel mean/std; its
    classifier head computes float32 logits under bf16 autocast (``adre_ray.models.precision``).
    Never downloads weights.
    """
    check_model_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 2")
    info = dataset_info(dataset)
    net = _REGISTRY[name](num_classes, dataset)
    return fp32_logits(NormalizedModel(NormalizeLayer(info.mean, info.std), net))  # type: ignore[return-value]
