"""Training math in pure PyTorch (no Ray): the four losses, PGD on the smoothed classifier, schedules,
and the per-epoch train / noisy-evaluation functions. See docs/training-methods.md.

Names are imported on first use (``adre_ray.lazy``): ``adre_ray.training.names`` (the vocabulary the
configs read) imports without torch.
"""

from adre_ray.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("pgd_l2_smoothed", "project_l2", "smoothed_objective"), "attacks"),
    **dict.fromkeys(("evaluate_under_noise", "train_one_epoch", "unpack_batch"), "loop"),
    **dict.fromkeys(("LOSS_REGISTRY", "AdreAdvLoss", "AdreRegLoss", "GaussianLoss", "LossFn", "LossOutput",
                     "LossParams", "SmoothAdvLoss", "build_loss", "loss_from_config", "loss_names",
                     "register_loss", "warmup_epsilon"), "losses"),
    **dict.fromkeys(("build_optimizer", "build_scheduler", "lr_factor"), "schedules"),
    **dict.fromkeys(("BUILT_IN_LOSSES", "PER_LOSSES", "SCHEDULES"), "names"),
    **dict.fromkeys(("draw_noise", "log_smoothed_score", "noisy_logits", "runner_up"), "smoothed_score"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
