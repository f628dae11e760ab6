"""The plug-in smoothed score G over k noise draws, in log space, and its runner-up class.

For logits ``f(x + d_j)``, j = 1..k, the plug-in estimate of the smoothed soft classifier is
``G^c = (1/k) sum_j softmax(f(x + d_j))^c``. We return ``log G`` computed as
``logsumexp_j log_softmax(f(x + d_j)) - log k`` so that very confident logits (softmax underflowing to
0) still give finite values and finite gradients.
"""

from __future__ import annotations

import math

import torch


def log_smoothed_score(logits: torch.Tensor) -> torch.Tensor:
    """``log G`` of shape (B, K) from per-draw logits of shape (B, k, K); computed in float32.

    ``log G_i^c = logsumexp_j log_softmax(logits_ij)^c - log k``, i.e. the log of the mean softmax.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: expected (B, k, K)")
    k = logits.shape[1]
    return torch.logsumexp(torch.log_softmax(logits.float(), dim=-1), dim=1) - math.log(k)


def runner_up(log_G: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``argmax_{c != y_i} G_i^c`` per example (LongTensor (B,), detached; never equal to ``y_i``).

    The label's score is masked to -inf before the argmax, so the result is the top class when the
    label is not the top class and the second class when it is.
    """
    if log_G.dim() != 2 or log_G.shape[1] < 2:
        raise ValueError(f"log_G.shape={tuple(log_G.shape)}: expected (B, K) with K >= 2 classes")
    masked = log_G.detach().clone()
    masked.scatter_(1, y.view(-1, 1).long(), float("-inf"))
    return masked.argmax(dim=1)


def noisy_logits(model: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Logits (B, k, K) of ``model(x_i + noise_ij)``, from ONE forward pass on the B*k noisy inputs.

    ``x``: (B, C, H, W); ``noise``: (B, k, C, H, W), already scaled by sigma. ``x`` is broadcast over the
    k draws (an expanded view, no copy of x). A channels_last ``x`` gives channels_last noisy inputs (so a
    channels_last model runs without a layout conversion).
    """
    if noise.dim() != x.dim() + 1 or noise.shape[0] != x.shape[0] or noise.shape[2:] != x.shape[1:]:
        raise ValueError(f"noise.shape={tuple(noise.shape)}: expected (B, k, *x.shape[1:]) for "
                         f"x.shape={tuple(x.shape)}")
    batch, k = noise.shape[:2]
    noisy = (x.unsqueeze(1) + noise).reshape(batch * k, *x.shape[1:])
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        noisy = noisy.contiguous(memory_format=torch.channels_last)  # same values, the model's layout
    logits = model(noisy)
    return logits.reshape(batch, k, -1)


def draw_noise(x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """``sigma * N(0, I)`` of shape (B, k, *x.shape[1:]) on x's device and dtype (global torch RNG)."""
    return torch.randn((x.shape[0], k, *x.shape[1:]), device=x.device, dtype=x.dtype).mul_(sigma)
