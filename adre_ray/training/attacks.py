"""l2 PGD on the plug-in smoothed classifier (SmoothAdv, Salman et al. 2019; ADRE_ADV, ADRE eq. 12-13).

The attack maximises, over ``x'`` with ``||x' - x||_2 <= epsilon`` and ``x'`` in [0, 1]^d,

    J(x') = CE(G(x'), y) - lam * CE(G(x'), yhat(x')),   yhat(x') = argmax_{c != y} G^c(x'),

where ``G(x') = (1/k) sum_j softmax(f(x' + d_j))`` uses the SAME k noise draws ``d_j`` at every step.
``J = -log G^y + lam * log G^yhat``: lam = 0 is SmoothAdv's attack on the smoothed soft classifier;
lam > 0 also pushes the runner-up's score G^yhat up, so the attack seeks the x' where the ADRE term is
worst (the training loss then pushes the runner-up down at that x').

Each of the M steps is ``x' <- clip_[0,1](Proj_eps(x' + a * g / ||g||_2))``, a = 2 eps / M, starting at
``x' = x`` (as SmoothAdv's PGD_L2). Clipping after the projection keeps the l2 constraint, because
for x in [0, 1]^d clipping only moves each coordinate of x' towards x.
"""

from __future__ import annotations

import torch

from adre_ray.training.checks import AtLeastOne, NonNegativeFloat, checked
from adre_ray.training.compiled import local_module
from adre_ray.training.modes import eval_mode
from adre_ray.training.smoothed_score import log_smoothed_score, noisy_logits, runner_up

_NORM_FLOOR = 1e-12


def smoothed_objective(log_G: torch.Tensor, y: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """Per-example attack objective ``J_i = -log G_i^{y_i} + lam * log G_i^{yhat_i}`` (shape (B,))."""
    objective = -log_G.gather(1, y.view(-1, 1)).squeeze(1)
    if lam != 0.0:
        objective = objective + lam * log_G.gather(1, runner_up(log_G, y).view(-1, 1)).squeeze(1)
    return objective


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """l2 norm of each example, shaped (B, 1, ..., 1) for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project_l2(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Project each example of ``delta`` onto the l2 ball of radius ``epsilon``."""
    norms = _per_example_norm(delta)
    return delta * torch.clamp(epsilon / norms.clamp_min(_NORM_FLOOR), max=1.0)


def pgd_l2_smoothed(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    lam: float = 0.0,
) -> torch.Tensor:
    """M = ``steps`` steps of l2 PGD on ``J`` (module docstring); returns a detached ``x_adv``.

    ``x`` (B, C, H, W) in [0, 1]; ``noise`` (B, k, C, H, W), already scaled by sigma, fixed over the
    steps. Guarantees: ``||x_adv_i - x_i||_2 <= epsilon`` and ``x_adv`` in [0, 1]. The model runs in eval
    mode (every submodule's mode is restored afterwards) and gradients are taken w.r.t. the input only,
    so parameters' ``.grad`` are untouched. A DDP-wrapped model (compiled or not) is attacked through its
    local module (``adre_ray.training.compiled.local_module``: no gradient synchronisation in an attack).
    """
    checked("epsilon", epsilon, NonNegativeFloat)
    checked("steps", steps, AtLeastOne)
    checked("lam", lam, NonNegativeFloat)
    x = x.detach()
    if epsilon == 0:
        return x.clone()
    net = local_module(model)
    step_size = 2.0 * epsilon / steps
    noise = noise.detach()
    x_adv = x.clone()
    with eval_mode(net):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                log_G = log_smoothed_score(noisy_logits(net, x_adv, noise))
                objective = smoothed_objective(log_G, y, lam).sum()
                (grad,) = torch.autograd.grad(objective, [x_adv])
            with torch.no_grad():
                grad = grad.float()
                step = grad / _per_example_norm(grad).clamp_min(_NORM_FLOOR)
                delta = project_l2(x_adv.detach() + step_size * step.to(x.dtype) - x, epsilon)
                x_adv = (x + delta).clamp_(0.0, 1.0)
    return x_adv.detach()
