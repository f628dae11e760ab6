"""ADRE_REG (ADRE Algorithm 1, eq. 6-8): k draws per example, loss = mean_i (l_per_i - lam * l_adre_i)."""

from __future__ import annotations

from typing import Literal

import torch

from adre_ray.training.loss_params import AdreRegParams
from adre_ray.training.losses.base import (
    LossFn,
    LossOutput,
    adre_reg_loss,
    first_draw_correct,
    noisy_logits,
    register_loss,
)
from adre_ray.training.names import PER_LOSSES  # noqa: F401 - re-exported


@register_loss
class AdreRegLoss(LossFn):
    """ADRE_REG on one forward pass over the B*k noisy inputs.

    l_per_i = mean_j CE(f(x_i + d_ij), y_i) (``per_loss="single"``: one random j);
    log G_i = logsumexp_j log_softmax(f(x_i + d_ij)) - log k; yhat_i = argmax_{c != y_i} G_i^c (no
    gradient through the choice); l_adre_i = -log G_i^{yhat_i}. lam = 0 is Gaussian augmentation with
    k draws.
    """

    name = "adre_reg"
    Params = AdreRegParams
    lam: float
    per_loss: Literal["mean", "single"]

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        logits = noisy_logits(model, x, self.draw_noise(x))
        loss, l_per, l_adre = adre_reg_loss(logits, y, self.per_draw_ce(logits, y), lam=self.lam,
                                            per_loss=self.per_loss)
        return LossOutput(loss=loss, l_per=l_per, l_adre=l_adre, correct=first_draw_correct(logits, y),
                          batch_size=x.shape[0])
