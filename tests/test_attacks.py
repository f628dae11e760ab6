"""l2 PGD on the plug-in smoothed classifier: constraints, ascent, eval mode, no parameter gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adre_ray.training import (
    attacks,
    log_smoothed_score,
    noisy_logits,
    pgd_l2_smoothed,
    project_l2,
    smoothed_objective,
)

B, C, H, W, K = 8, 3, 8, 8, 4


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))


def inputs(seed: int = 1, k: int = 3, sigma: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g)
    x[:, 0] = (x[:, 0] > 0.5).float()  # a third of the pixels on the box boundary: clipping is exercised
    y = torch.randint(K, (B,), generator=g)
    noise = sigma * torch.randn(B, k, C, H, W, generator=g)
    return x, y, noise


def objective(model, x, y, noise, lam):
    with torch.no_grad():
        return smoothed_objective(log_smoothed_score(noisy_logits(model, x, noise)), y, lam)


def l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("epsilon,steps", [(0.25, 1), (1.0, 5), (3.0, 7)])
def test_pgd_stays_in_ball_and_box(lam, epsilon, steps):
    model = linear_model()
    x, y, noise = inputs()
    x_adv = pgd_l2_smoothed(model, x, y, noise, epsilon=epsilon, steps=steps, lam=lam)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (l2(x_adv - x) <= epsilon + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_pgd_raises_objective_over_clean_and_random(lam):
    model = linear_model()
    x, y, noise = inputs()
    epsilon = 0.5
    x_adv = pgd_l2_smoothed(model, x, y, noise, epsilon=epsilon, steps=5, lam=lam)
    clean = objective(model, x, y, noise, lam)
    attacked = objective(model, x_adv, y, noise, lam)
    assert (attacked > clean).all()
    # a random direction of the same length does much worse than the gradient ascent
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    x_random = (x + epsilon * direction / l2(direction).view(-1, 1, 1, 1)).clamp(0, 1)
    random = objective(model, x_random, y, noise, lam)
    assert (attacked - clean).mean() > 2 * (random - clean).abs().mean()


def test_one_step_is_normalised_gradient_projected_to_epsilon():
    """M = 1: a = 2 eps, so x~ = x + Proj_eps(2 eps g/||g||) = x + eps g/||g|| (no clipping at x = 0.5)."""
    model = linear_model()
    _, y, noise = inputs()
    x = torch.full((B, C, H, W), 0.5)
    epsilon = 0.05  # |step per pixel| <= eps, so x stays inside [0.45, 0.55]: no clipping
    x_req = x.clone().requires_grad_(True)
    obj = smoothed_objective(log_smoothed_score(noisy_logits(model, x_req, noise)), y, 0.0).sum()
    (g,) = torch.autograd.grad(obj, x_req)
    expected = x + epsilon * g / l2(g).view(-1, 1, 1, 1)
    x_adv = pgd_l2_smoothed(model, x, y, noise, epsilon=epsilon, steps=1)
    torch.testing.assert_close(x_adv, expected, rtol=1e-5, atol=1e-6)


def test_step_size_is_two_epsilon_over_steps(monkeypatch):
    """The first step starts at x, so the first unprojected delta has norm a = 2 eps / M exactly."""
    model = linear_model()
    x, y, noise = inputs()
    norms = []

    def spy(delta, epsilon):
        norms.append(l2(delta))
        return project_l2(delta, epsilon)

    monkeypatch.setattr(attacks, "project_l2", spy)
    pgd_l2_smoothed(model, x, y, noise, epsilon=1.0, steps=4)
    assert len(norms) == 4
    torch.testing.assert_close(norms[0], torch.full((B,), 2 * 1.0 / 4))


def test_smoothed_objective_formula():
    log_G = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    y = torch.tensor([0, 0])
    # J = -log G^y + lam * log G^yhat, yhat = runner-up (1 for both rows)
    expected = torch.tensor([-torch.log(torch.tensor(0.5)) + 0.5 * torch.log(torch.tensor(0.3)),
                             -torch.log(torch.tensor(0.1)) + 0.5 * torch.log(torch.tensor(0.6))])
    torch.testing.assert_close(smoothed_objective(log_G, y, 0.5), expected)


class ModeRecorder(nn.Module):
    """Linear model with BatchNorm that records the training flag of each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))
        self.modes: list[bool] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.head(self.norm(inputs))


def test_attack_in_eval_mode_restores_modes_and_leaves_params_alone():
    model = ModeRecorder()
    model.train()
    model.head.eval()  # a submodule deliberately in eval mode must stay so
    x, y, noise = inputs()
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s.clone()
    running_mean = model.norm.running_mean.clone()
    rng_state = torch.get_rng_state()
    pgd_l2_smoothed(model, x, y, noise, epsilon=0.5, steps=3, lam=0.3)
    assert model.modes == [False, False, False]
    assert model.training and model.norm.training and not model.head.training
    assert torch.equal(model.norm.running_mean, running_mean)  # eval-mode BN: statistics untouched
    for p, s in zip(model.parameters(), sentinel, strict=True):
        assert torch.equal(p.grad, s)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the given noise is reused, none is drawn


def test_attack_uses_the_given_noise_at_every_step():
    """With noise = 0 the smoothed score is f itself: the attack on f alone must give the same x~."""
    model = linear_model()
    x, y, noise = inputs(k=2)
    zero = torch.zeros_like(noise)
    x_zero = pgd_l2_smoothed(model, x, y, zero, epsilon=0.5, steps=3)
    x_single = pgd_l2_smoothed(model, x, y, zero[:, :1], epsilon=0.5, steps=3)
    torch.testing.assert_close(x_zero, x_single)
    assert not torch.allclose(x_zero, pgd_l2_smoothed(model, x, y, noise, epsilon=0.5, steps=3))


def test_epsilon_zero_returns_input_and_bad_values_raise():
    model = linear_model()
    x, y, noise = inputs()
    assert torch.equal(pgd_l2_smoothed(model, x, y, noise, epsilon=0.0, steps=3), x)
    with pytest.raises(ValueError, match=r"^epsilon=-0\.1:"):
        pgd_l2_smoothed(model, x, y, noise, epsilon=-0.1, steps=3)
    with pytest.raises(ValueError, match=r"^steps=0:"):
        pgd_l2_smoothed(model, x, y, noise, epsilon=0.1, steps=0)
    with pytest.raises(ValueError, match=r"^noise.shape=\(8, 3, 3, 8\):"):
        pgd_l2_smoothed(model, x, y, noise[..., 0], epsilon=0.1, steps=1)


def test_project_l2():
    delta = torch.randn(5, C, H, W, generator=torch.Generator().manual_seed(0))
    delta[0] *= 1e-3  # inside the ball: unchanged
    projected = project_l2(delta, 1.0)
    torch.testing.assert_close(projected[0], delta[0])
    torch.testing.assert_close(l2(projected[1:]), torch.ones(4))
    torch.testing.assert_close(projected[1:] / l2(projected[1:]).view(-1, 1, 1, 1),
                               delta[1:] / l2(delta[1:]).view(-1, 1, 1, 1))
