"""Common interface of the training losses: ``loss_fn(model, x, y, epoch) -> LossOutput``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import cross_entropy

from adre_ray.config.base import check, check_int_at_least, check_nonnegative, check_positive
from adre_ray.training.smoothed_score import draw_noise, log_smoothed_score, noisy_logits, runner_up


@dataclass
class LossOutput:
    """One training step's loss and its detached parts (tensors stay on the device: no host sync).

    loss: scalar with grad, to call ``.backward()`` on. l_per: mean over the batch of the per-example
    classification loss. l_adre: mean over the batch of ``-log G^{yhat}`` (0 for gaussian / smoothadv).
    correct: number of examples whose first noisy draw is classified as y (train accuracy under noise;
    at x~ for the adversarial losses). batch_size: B. epsilon: the attack radius used this step (0 when
    there was no attack).
    """

    loss: torch.Tensor
    l_per: torch.Tensor
    l_adre: torch.Tensor
    correct: torch.Tensor
    batch_size: int
    epsilon: float = 0.0


class LossFn:
    """Base class: holds sigma, k and label smoothing; draws noise and runs the one noisy forward."""

    name = "base"

    def __init__(self, *, sigma: float, k: int = 1, label_smoothing: float = 0.0) -> None:
        check_positive("sigma", sigma)
        check_int_at_least("k", k, 1)
        check_nonnegative("label_smoothing", label_smoothing)
        check(label_smoothing < 1, "label_smoothing", label_smoothing, "must be < 1")
        self.sigma = float(sigma)
        self.k = int(k)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def draw_noise(self, x: torch.Tensor) -> torch.Tensor:
        """k Gaussian draws per example, ``sigma * N(0, I)``, shape (B, k, C, H, W)."""
        return draw_noise(x, self.k, self.sigma)

    def per_draw_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``CE(f(x_i + d_ij), y_i)`` of shape (B, k), in float32, with label smoothing."""
        batch, k, classes = logits.shape
        ce = cross_entropy(logits.float().reshape(batch * k, classes), y.repeat_interleave(k),
                             reduction="none", label_smoothing=self.label_smoothing)
        return ce.view(batch, k)


def first_draw_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many examples have ``argmax f(x_i + d_i1) == y_i`` (detached int64 scalar on the device)."""
    return (logits[:, 0].detach().argmax(dim=1) == y).sum()


def adre_reg_loss(
    logits: torch.Tensor, y: torch.Tensor, per_draw_ce: torch.Tensor, *, lam: float, per_loss: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, mean l_per, mean l_adre)`` of ADRE_REG: loss = mean_i (l_per_i - lam * l_adre_i).

    l_per_i = mean_j CE(f(x_i + d_ij), y_i) (``per_loss="single"``: one uniformly random j per example);
    log G_i = logsumexp_j log_softmax(f(x_i + d_ij)) - log k; yhat_i = argmax_{c != y_i} G_i^c (no
    gradient through the choice); l_adre_i = -log G_i^{yhat_i}.
    """
    batch, k = per_draw_ce.shape
    if per_loss == "single" and k > 1:
        pick = torch.randint(k, (batch, 1), device=per_draw_ce.device)
        l_per = per_draw_ce.gather(1, pick).squeeze(1)
    else:
        l_per = per_draw_ce.mean(dim=1)
    log_G = log_smoothed_score(logits if lam != 0.0 else logits.detach())
    yhat = runner_up(log_G, y)
    l_adre = -log_G.gather(1, yhat.view(-1, 1)).squeeze(1)
    loss = (l_per - lam * l_adre).mean() if lam != 0.0 else l_per.mean()
    return loss, l_per.detach().mean(), l_adre.detach().mean()




def warmup_epsilon(epsilon: float, epoch: int, warmup_epochs: int) -> float:
    """SmoothAdv's attack-radius warm-up: ``epsilon * min(1, (epoch + 1) / warmup_epochs)`` (0-based epoch).

    ``warmup_epochs = 0`` means no warm-up (the full epsilon from epoch 0).
    """
    check_int_at_least("epoch", epoch, 0)
    if warmup_epochs <= 0:
        return float(epsilon)
    return float(epsilon) * min(1.0, (epoch + 1) / warmup_epochs)


__all__ = ["LossFn", "LossOutput", "adre_reg_loss", "first_draw_correct", "noisy_logits", "warmup_epsilon"]
