"""Input normalization inside the model, so the model consumes [0, 1] pixels.

Gaussian noise, PGD balls and certified l2 radii are then all measured in pixel space, as in Cohen et
al. (2019): the smoothed classifier is g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), with x in
[0, 1]^(C x H x W) and f = net o normalize.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class NormalizeLayer(nn.Module):
    """y[:, c] = (x[:, c] - mean[c]) / std[c] for an (N, C, H, W) batch (or one (C, H, W) image).

    ``mean``/``std`` are non-persistent buffers: they follow ``.to(device)`` but are not part of the
    state dict (the checkpoint's ``dataset`` determines them).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean={tuple(mean)!r}, std={tuple(std)!r}: need one value per channel each")
        if any(not s > 0 for s in std):
            raise ValueError(f"std={tuple(std)!r}: every value must be > 0")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def num_channels(self) -> int:
        return self.mean.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-3] != self.num_channels:
            raise ValueError(f"input shape {tuple(x.shape)}: expected (N, {self.num_channels}, H, W)")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Sequential):
    """``nn.Sequential(NormalizeLayer(mean, std), net)``: [0, 1] pixels in, logits out.

    ``model[0]`` / ``model.normalize`` is the normalization, ``model[1]`` / ``model.net`` the network;
    state-dict keys are ``1.<net key>``.
    """

    def __init__(self, normalize: NormalizeLayer, net: nn.Module) -> None:
        super().__init__(normalize, net)

    @property
    def normalize(self) -> NormalizeLayer:
        return self[0]  # type: ignore[return-value]

    @property
    def net(self) -> nn.Module:
        return self[1]
