"""Model callables for ``certify --model-fn`` tests: ``tests.model_fns:<name>`` from the repository root
(Ray adds the driver's working directory to its workers' path), ``model_fns:<name>`` inside tests/."""

from __future__ import annotations

import torch
from torch import nn

from adre_ray.models import build_model


class ClampDenoiser(nn.Module):
    """A stand-in denoiser: clamps the noisy [0, 1] image back into [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def seeded_small_cnn() -> nn.Module:
    """small_cnn with weights fixed by seed 3 (the same network every call, in every process)."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return build_model("small_cnn", 10, "cifar10").eval()


def denoised_small_cnn() -> nn.Module:
    """Denoiser followed by the classifier: a model that is no registered architecture."""
    return nn.Sequential(ClampDenoiser(), seeded_small_cnn())


def not_a_module() -> str:
    return "oops"


def small_mnist_net() -> nn.Module:
    """Levine et al.'s small MNIST net as the user-style example writes it (examples/levine2020): the
    published state dict (keys ``1.*``) loads into it strictly."""
    from examples.levine2020.small_mnist import small_mnist_net as build

    return build()


def vector_net() -> nn.Module:
    """A 10 -> 16 -> 3 MLP on vectors (weights fixed by seed 7)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
