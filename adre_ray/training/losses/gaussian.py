"""Basic (Cohen et al. 2019): Gaussian noise augmentation, ``CE(f(x + d), y)``, d ~ N(0, sigma^2 I)."""

from __future__ import annotations

import torch

from adre_ray.training.losses.base import LossFn, LossOutput, first_draw_correct, noisy_logits, register_loss


@register_loss
class GaussianLoss(LossFn):
    """loss = mean_i mean_j CE(f(x_i + d_ij), y_i) over k draws (k = 1: the paper's Basic training).

    Parameters: sigma, k, label_smoothing (:class:`LossParams`)."""

    name = "gaussian"

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        logits = noisy_logits(model, x, self.draw_noise(x))
        loss = self.per_draw_ce(logits, y).mean()
        return LossOutput(loss=loss, l_per=loss.detach(), l_adre=torch.zeros((), device=x.device),
                          correct=first_draw_correct(logits, y), batch_size=x.shape[0])
