"""A Gaussian-smoothed classifier g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), for one process.

In the spirit of Cohen et al.'s ``Smooth`` class: the Monte Carlo part is ``sample_counts`` and the
statistics are the count functions of ``certify.py``, so results equal those of the distributed driver
for the same (seed, idx) when it runs the pilot and the main draws each as shard 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adre_ray.smoothing.certify import (
    DEFAULT_GRID,
    SmoothingResult,
    _check_mode,
    certify_counts,
    predict_counts,
    tcertify_counts,
)
from adre_ray.smoothing.params import check_alpha, check_grid, check_sigma
from adre_ray.smoothing.sampler import MAIN_STREAM, PILOT_STREAM, effective_batch_size, sample_counts


@dataclass(frozen=True, eq=False)
class Certification:
    """CERTIFY and T-CERTIFY of one image computed from the same pilot and estimation counts."""

    certify: SmoothingResult
    tcertify: SmoothingResult
    pilot_counts: np.ndarray
    counts: np.ndarray


class SmoothedClassifier:
    """Gaussian smoothing of ``model`` (logits over ``num_classes``) at noise level ``sigma``.

    ``x`` is one image (C, H, W) in the pixel space the noise is added in; radii are l2 distances there.
    ``batch_size`` (rounded to whole noise blocks), ``amp_dtype`` and ``channels_last`` only change
    speed, never the noise: counts depend on (seed, idx, stream) and the model alone.
    """

    def __init__(self, model: torch.nn.Module, num_classes: int, sigma: float, *, batch_size: int = 1000,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 2")
        effective_batch_size(batch_size)  # validates
        self.model = model
        self.num_classes = num_classes
        self.sigma = check_sigma(sigma)
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last

    def counts(self, x: torch.Tensor, num: int, *, seed: int = 0, idx: int = 0, stream: int = MAIN_STREAM
               ) -> np.ndarray:
        """Class counts (int64) of f(x + d) over ``num`` draws of the noise stream (seed, idx, stream)."""
        if self.model.training:
            raise ValueError("model.training=True: call model.eval() before sampling (batch norm, dropout)")
        counts = sample_counts(
            self.model, x, num, self.num_classes, self.sigma, batch_size=self.batch_size, seed=seed, idx=idx,
            shard=0, stream=stream, amp_dtype=self.amp_dtype, channels_last=self.channels_last,
        )
        return counts.numpy().astype(np.int64)

    def predict(self, x: torch.Tensor, n: int, alpha: float, *, seed: int = 0, idx: int = 0
                ) -> SmoothingResult:
        """Cohen's PREDICT on ``n`` draws: g(x) or abstain; wrong (and not abstaining) w.p. <= alpha."""
        check_alpha(alpha)
        return predict_counts(self.counts(x, n, seed=seed, idx=idx, stream=MAIN_STREAM), alpha)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, *, seed: int = 0, idx: int = 0,
                mode: str = "pilot", grid: Sequence[float] = DEFAULT_GRID, pb_bound: str = "sum"
                ) -> Certification:
        """CERTIFY and T-CERTIFY from ``n0`` pilot draws (class selection) and ``n`` independent draws.

        Each non-abstaining answer (class cA, radius R) satisfies, with probability >= 1 - alpha over the
        noise: g(x + delta) = cA for every ||delta||_2 < R. For T-CERTIFY this holds in the ``pilot`` and
        ``bonferroni`` modes; ``paper`` only guarantees 1 - alpha (t_max + 1 - t_min). ``pb_bound``: the
        runner-up bound of T-CERTIFY, ``sum`` (eq. 14) or ``max`` (ignored in ``paper`` mode).
        """
        check_alpha(alpha)
        _check_mode(mode)
        check_grid(grid)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r}: must be an integer >= 1")
        pilot = self.counts(x, n0, seed=seed, idx=idx, stream=PILOT_STREAM)
        counts = self.counts(x, n, seed=seed, idx=idx, stream=MAIN_STREAM)
        return Certification(
            certify=certify_counts(pilot, counts, self.sigma, alpha),
            tcertify=tcertify_counts(pilot, counts, self.sigma, alpha, mode=mode, grid=grid,
                                     pb_bound=pb_bound),
            pilot_counts=pilot, counts=counts,
        )
