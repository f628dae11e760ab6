"""SmoothAdv (Salman et al. 2019): PGD on the smoothed soft classifier, then noisy CE at the attack point."""

from __future__ import annotations

import torch

from adre_ray.training.attacks import pgd_l2_smoothed
from adre_ray.training.loss_params import PgdParams
from adre_ray.training.losses.base import (
    LossFn,
    LossOutput,
    first_draw_correct,
    noisy_logits,
    register_loss,
)


@register_loss
class SmoothAdvLoss(LossFn):
    """SmoothAdv's "PGD_k" training with k noise draws (Salman et al.'s multi-noise variant).

    Draw d_ij, j = 1..k; x~_i = ``steps`` steps of l2 PGD on CE(G(x'), y_i) = -log G^{y_i}(x') in the
    ball of radius eps_epoch (warm-up: eps * min(1, (epoch + 1) / warmup_epochs)), G over the same draws;
    loss = mean_i mean_j CE(f(x~_i + d_ij), y_i) with the SAME draws d_ij, as Salman et al.'s code does.
    """

    name = "smoothadv"
    Params = PgdParams
    params: PgdParams
    epsilon: float
    steps: int
    warmup_epochs: int

    def epsilon_at(self, epoch: int) -> float:
        """Attack radius in ``epoch`` (0-based): ``epsilon * min(1, (epoch + 1) / warmup_epochs)``."""
        return self.params.epsilon_at(epoch)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        noise = self.draw_noise(x)
        epsilon = self.epsilon_at(epoch)
        x_adv = pgd_l2_smoothed(model, x, y, noise, epsilon=epsilon, steps=self.steps, lam=0.0)
        logits = noisy_logits(model, x_adv, noise)
        loss = self.per_draw_ce(logits, y).mean()
        return LossOutput(loss=loss, l_per=loss.detach(), l_adre=torch.zeros((), device=x.device),
                          correct=first_draw_correct(logits, y), batch_size=x.shape[0], epsilon=epsilon)
