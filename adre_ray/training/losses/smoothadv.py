"""SmoothAdv (Salman et al. 2019): PGD on the smoothed soft classifier, then noisy CE at the attack point."""

from __future__ import annotations

import torch

from adre_ray.config.base import check_int_at_least, check_nonnegative
from adre_ray.training.attacks import pgd_l2_smoothed
from adre_ray.training.losses.base import LossFn, LossOutput, first_draw_correct, noisy_logits, warmup_epsilon


class SmoothAdvLoss(LossFn):
    """SmoothAdv's "PGD_k" training with k noise draws (Salman et al.'s multi-noise variant).

    Draw d_ij, j = 1..k; x~_i = ``steps`` steps of l2 PGD on CE(G(x'), y_i) = -log G^{y_i}(x') in the
    ball of radius eps_epoch (warm-up: eps * min(1, (epoch + 1) / warmup_epochs)), G over the same draws;
    loss = mean_i mean_j CE(f(x~_i + d_ij), y_i) with the SAME draws d_ij, as Salman et al.'s code does.
    """

    name = "smoothadv"

    def __init__(self, *, sigma: float, k: int = 1, epsilon: float = 0.0, steps: int = 1,
                 warmup_epochs: int = 0, label_smoothing: float = 0.0) -> None:
        super().__init__(sigma=sigma, k=k, label_smoothing=label_smoothing)
        check_nonnegative("epsilon", epsilon)
        check_int_at_least("steps", steps, 1)
        check_int_at_least("warmup_epochs", warmup_epochs, 0)
        self.epsilon = float(epsilon)
        self.steps = int(steps)
        self.warmup_epochs = int(warmup_epochs)

    def epsilon_at(self, epoch: int) -> float:
        """Attack radius in ``epoch`` (0-based): ``epsilon * min(1, (epoch + 1) / warmup_epochs)``."""
        return warmup_epsilon(self.epsilon, epoch, self.warmup_epochs)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        noise = self.draw_noise(x)
        epsilon = self.epsilon_at(epoch)
        x_adv = pgd_l2_smoothed(model, x, y, noise, epsilon=epsilon, steps=self.steps, lam=0.0)
        logits = noisy_logits(model, x_adv, noise)
        loss = self.per_draw_ce(logits, y).mean()
        return LossOutput(loss=loss, l_per=loss.detach(), l_adre=torch.zeros((), device=x.device),
                          correct=first_draw_correct(logits, y), batch_size=x.shape[0], epsilon=epsilon)
