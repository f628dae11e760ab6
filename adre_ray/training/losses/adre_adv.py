"""ADRE_ADV (ADRE eq. 12-13): PGD on the ADRE objective, then the ADRE_REG loss at the attack point."""

from __future__ import annotations

import torch

from adre_ray.config.base import check_choice, check_int_at_least, check_nonnegative
from adre_ray.training.attacks import pgd_l2_smoothed
from adre_ray.training.losses.adre_reg import PER_LOSSES
from adre_ray.training.losses.base import (
    LossFn,
    LossOutput,
    adre_reg_loss,
    first_draw_correct,
    noisy_logits,
    warmup_epsilon,
)


class AdreAdvLoss(LossFn):
    """ADRE_ADV: x~ from l2 PGD on CE(G(x'), y) - lam * CE(G(x'), yhat(x')), then ADRE_REG at x~.

    The attack uses k draws d_ij fixed across its ``steps`` steps, radius eps_epoch (warm-up as
    SmoothAdv). The ADRE_REG loss at x~ reuses the SAME draws by default (``fresh_noise=False``), so with
    lam = 0 (and per_loss="mean") this is exactly SmoothAdv's multi-noise loss.
    """

    name = "adre_adv"

    def __init__(self, *, sigma: float, k: int = 1, lam: float = 0.0, per_loss: str = "mean",
                 epsilon: float = 0.0, steps: int = 1, warmup_epochs: int = 0, label_smoothing: float = 0.0,
                 fresh_noise: bool = False) -> None:
        super().__init__(sigma=sigma, k=k, label_smoothing=label_smoothing)
        check_nonnegative("lam", lam)
        check_choice("per_loss", per_loss, PER_LOSSES)
        check_nonnegative("epsilon", epsilon)
        check_int_at_least("steps", steps, 1)
        check_int_at_least("warmup_epochs", warmup_epochs, 0)
        self.lam = float(lam)
        self.per_loss = per_loss
        self.epsilon = float(epsilon)
        self.steps = int(steps)
        self.warmup_epochs = int(warmup_epochs)
        self.fresh_noise = bool(fresh_noise)

    def epsilon_at(self, epoch: int) -> float:
        """Attack radius in ``epoch`` (0-based): ``epsilon * min(1, (epoch + 1) / warmup_epochs)``."""
        return warmup_epsilon(self.epsilon, epoch, self.warmup_epochs)

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
