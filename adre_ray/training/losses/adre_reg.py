"""ADRE_REG (ADRE Algorithm 1, eq. 6-8): k draws per example, loss = mean_i (l_per_i - lam * l_adre_i)."""

from __future__ import annotations

import torch

from adre_ray.config.base import (
    PER_LOSSES,
    check_choice,
    check_nonnegative,
)
from adre_ray.training.losses.base import LossFn, LossOutput, adre_reg_loss, first_draw_correct, noisy_logits


class AdreRegLoss(LossFn):
    """ADRE_REG on one forward pass over the B*k noisy inputs.

    l_per_i = mean_j CE(f(x_i + d_ij), y_i) (``per_loss="single"``: one random j);
    log G_i = logsumexp_j log_softmax(f(x_i + d_ij)) - log k; yhat_i = argmax_{c != y_i} G_i^c (no
    gradient through the choice); l_adre_i = -log G_i^{yhat_i}. lam = 0 is Gaussian augmentation with
    k draws.
    """

    name = "adre_reg"

    def __init__(self, *, sigma: float, k: int = 1, lam: float = 0.0, per_loss: str = "mean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__(sigma=sigma, k=k, label_smoothing=label_smoothing)
        check_nonnegative("lam", lam)
        check_choice("per_loss", per_loss, PER_LOSSES)
        self.lam = float(lam)
        self.per_loss = per_loss

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        logits = noisy_logits(model, x, self.draw_noise(x))
        loss, l_per, l_adre = adre_reg_loss(logits, y, self.per_draw_ce(logits, y), lam=self.lam,
                                            per_loss=self.per_loss)
        return LossOutput(loss=loss, l_per=l_per, l_adre=l_adre, correct=first_draw_correct(logits, y),
                          batch_size=x.shape[0])
