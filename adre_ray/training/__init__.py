"""Training math in pure PyTorch (no Ray): the four losses, PGD on the smoothed classifier, schedules,
and the per-epoch train / noisy-evaluation functions. See docs/training-methods.md."""

from adre_ray.training.attacks import pgd_l2_smoothed, project_l2, smoothed_objective
from adre_ray.training.loop import evaluate_under_noise, train_one_epoch, unpack_batch
from adre_ray.training.losses import (
    LOSS_REGISTRY,
    AdreAdvLoss,
    AdreRegLoss,
    GaussianLoss,
    LossFn,
    LossOutput,
    LossParams,
    SmoothAdvLoss,
    build_loss,
    loss_from_config,
    loss_names,
    register_loss,
    warmup_epsilon,
)
from adre_ray.training.schedules import SCHEDULES, build_optimizer, build_scheduler, lr_factor
from adre_ray.training.smoothed_score import draw_noise, log_smoothed_score, noisy_logits, runner_up

__all__ = [
    "LOSS_REGISTRY", "SCHEDULES", "AdreAdvLoss", "AdreRegLoss", "GaussianLoss", "LossFn", "LossOutput",
    "LossParams", "SmoothAdvLoss", "build_loss", "build_optimizer", "build_scheduler", "draw_noise",
    "evaluate_under_noise", "log_smoothed_score", "loss_from_config", "loss_names", "lr_factor",
    "noisy_logits", "pgd_l2_smoothed", "project_l2", "register_loss", "runner_up", "smoothed_objective",
    "train_one_epoch", "unpack_batch", "warmup_epsilon",
]
