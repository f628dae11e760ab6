"""ADRE_ADV (ADRE eq. 12-13): PGD on the ADRE objective, then the ADRE_REG loss at the attack point."""

from __future__ import annotations

from typing import Any

import torch

from adre_ray.training.attacks import pgd_l2_smoothed
from adre_ray.training.loss_params import AdreAdvParams
from adre_ray.training.losses.base import (
    LossFn,
    LossOutput,
    adre_reg_loss,
    first_draw_correct,
    noisy_logits,
    register_loss,
)
from adre_ray.training.losses.smoothadv import SmoothAdvLoss


@register_loss
class AdreAdvLoss(LossFn):
    """ADRE_ADV: x~ from l2 PGD on CE(G(x'), y) - lam * CE(G(x'), yhat(x')), then ADRE_REG at x~.

    The attack uses k draws d_ij fixed across its ``steps`` steps, radius eps_epoch (warm-up as
    SmoothAdv). The ADRE_REG loss at x~ reuses the SAME draws by default (``fresh_noise=False``), so with
    lam = 0 (and per_loss="mean") this is exactly SmoothAdv's multi-noise loss.
    """

    name = "adre_adv"
    Params = AdreAdvParams
    params: AdreAdvParams
    lam: float
    per_loss: str
    steps: int
    epsilon_at = SmoothAdvLoss.epsilon_at

    def __init__(self, *, fresh_noise: bool = False, **params: Any) -> None:
        super().__init__(**params)
        self.fresh_noise = bool(fresh_noise)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        noise = self.draw_noise(x)
        epsilon = self.epsilon_at(epoch)
        x_adv = pgd_l2_smoothed(model, x, y, noise, epsilon=epsilon, steps=self.steps, lam=self.lam)
        if self.fresh_noise:
            noise = self.draw_noise(x)
        logits = noisy_logits(model, x_adv, noise)
        loss, l_per, l_adre = adre_reg_loss(logits, y, self.per_draw_ce(logits, y), lam=self.lam,
                                            per_loss=self.per_loss)
        return LossOutput(loss=loss, l_per=l_per, l_adre=l_adre, correct=first_draw_correct(logits, y),
                          batch_size=x.shape[0], epsilon=epsilon)
