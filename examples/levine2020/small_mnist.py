"""Levine et al. (2020)'s small MNIST classifier, written as a user's model function for adre-ray.

``small_mnist_net()`` returns the whole module the original randomized-smoothing code built:
``nn.Sequential(normalize, net)`` on 1x7x7 inputs in [0, 1] (an MNIST image mean-pooled over 4x4
blocks), so the published ``state_dict`` (keys ``1.conv1.*``, ``1.lin1.*``, ``1.lin2.*``) loads into it
strictly. Facts from ../shared/data/real/README.md:

    normalize  (x - 0.1307) / 0.2307            (no parameters: key "0" holds nothing)
    conv1      Conv2d(1, 4, kernel 2), ReLU      -> 4x6x6 = 144 values, flattened channel-first
    lin1       Linear(144, 100), ReLU
    lin2       Linear(100, 10)                   -> the logits

Use: ``adre-ray import-checkpoint checkpoint.pth.tar --format smoothing --model-fn
small_mnist:small_mnist_net --sigma 0.25 --output imported.pt`` run in this folder (or with it on
PYTHONPATH).
"""

from __future__ import annotations

import torch
from torch import nn

MNIST_POOLED_MEAN = 0.1307
MNIST_POOLED_STD = 0.2307


class Normalize(nn.Module):
    """(x - mean) / std with the statistics as plain attributes (not in the state dict, as in the
    original code's ``NormalizeLayer``)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallMnistNet(nn.Module):
    """conv 1->4 (2x2) + ReLU, flatten, 144->100 + ReLU, 100->10: logits of a 1x7x7 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=2)
        self.lin1 = nn.Linear(144, 100)
        self.lin2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.lin1(x.flatten(1)))  # flatten(1) of NCHW: channel-first, as the original view
        return self.lin2(x)


def small_mnist_net() -> nn.Module:
    """The model on 1x7x7 pooled MNIST inputs in [0, 1], normalization included."""
    return nn.Sequential(Normalize(MNIST_POOLED_MEAN, MNIST_POOLED_STD), SmallMnistNet())
