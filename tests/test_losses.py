"""Training losses: smoothed score, runner-up, ADRE_REG / Gaussian / SmoothAdv / ADRE_ADV, build_loss."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from adre_ray.config import LOSSES
from adre_ray.training import (
    LOSS_REGISTRY,
    AdreAdvLoss,
    AdreRegLoss,
    GaussianLoss,
    SmoothAdvLoss,
    build_loss,
    log_smoothed_score,
    runner_up,
)
from adre_ray.training.losses import adre_adv as adre_adv_module
from adre_ray.training.losses import smoothadv as smoothadv_module
from adre_ray.training.losses.base import adre_reg_loss

B, C, H, W, K = 6, 3, 8, 8, 5


def tiny_model(seed: int = 0, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g), torch.randint(K, (B,), generator=g)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------- smoothed score and runner-up


def test_log_smoothed_score_is_log_of_mean_softmax():
    logits = torch.randn(4, 7, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    expected = torch.log(torch.softmax(logits, dim=-1).mean(dim=1))
    # computed in float32: relative error of a few float32 ulps on values of order 1-10
    torch.testing.assert_close(log_smoothed_score(logits).double(), expected, rtol=1e-5, atol=1e-5)


def test_log_smoothed_score_finite_where_naive_log_underflows():
    logits = torch.randn(4, 3, K, generator=torch.Generator().manual_seed(0)) * 1e4
    naive = torch.log(torch.softmax(logits, dim=-1).mean(dim=1))
    assert torch.isinf(naive).any()  # the case the log-space formula exists for
    log_G = log_smoothed_score(logits)
    exact = torch.logsumexp(torch.log_softmax(logits.double(), -1), dim=1) - math.log(3)
    assert torch.isfinite(log_G).all()
    torch.testing.assert_close(log_G.double(), exact, rtol=1e-5, atol=1e-2)  # float32 on values ~1e4


def test_runner_up_label_on_top_and_not_on_top():
    log_G = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]]))
    y = torch.tensor([0, 0, 2])
    # row 0: label is top -> second class; row 1: label is not top -> the top class; row 2: top -> 1
    assert runner_up(log_G, y).tolist() == [1, 1, 1]


def test_runner_up_never_the_label_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        log_G = torch.log_softmax(torch.randn(64, K, generator=g) * 5, dim=-1)
        y = torch.randint(K, (64,), generator=g)
        y[:16] = log_G[:16].argmax(dim=1)  # force the "label is top" case too
        yhat = runner_up(log_G, y)
        assert (yhat != y).all()
        masked = log_G.clone()
        masked[torch.arange(64), y] = -float("inf")
        assert torch.equal(log_G[torch.arange(64), yhat], masked.max(dim=1).values)


def test_runner_up_is_detached_and_needs_two_classes():
    log_G = torch.randn(3, K, requires_grad=True)
    assert not runner_up(log_G, torch.zeros(3, dtype=torch.long)).requires_grad
    with pytest.raises(ValueError, match=r"log_G.shape=\(3, 1\)"):
        runner_up(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- ADRE_REG and Gaussian


def reference_adre_reg(model, x, y, noise, lam):
    """Per-example loop in float64, straight from the ARCHITECTURE.md formulas."""
    total = 0.0
    for i in range(x.shape[0]):
        logits = model(x[i:i + 1] + noise[i]).double()  # (k, K)
        ce = -torch.log_softmax(logits, -1)[:, y[i]]
        G = torch.softmax(logits, -1).mean(dim=0)
        others = [c for c in range(G.shape[0]) if c != y[i]]
        yhat = max(others, key=lambda c: G[c].item())
        total = total + ce.mean() - lam * (-torch.log(G[yhat]))
    return total / x.shape[0]


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_adre_reg_matches_reference_formula(lam):
    model, (x, y), k, sigma = tiny_model(), batch(), 4, 0.5
    torch.manual_seed(5)
    out = AdreRegLoss(sigma=sigma, k=k, lam=lam)(model, x, y, epoch=0)
    torch.manual_seed(5)
    noise = sigma * torch.randn(B, k, C, H, W)  # the documented draw: randn (B, k, C, H, W) * sigma
    expected = reference_adre_reg(model, x, y, noise, lam)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.batch_size == B and not out.l_per.requires_grad and not out.l_adre.requires_grad
    torch.testing.assert_close((out.l_per - lam * out.l_adre).double(), expected, rtol=1e-5, atol=1e-5)


def test_adre_reg_lambda_zero_equals_gaussian_with_same_draws():
    x, y = batch()
    losses, gradients = [], []
    for loss_fn in (AdreRegLoss(sigma=0.25, k=3, lam=0.0), GaussianLoss(sigma=0.25, k=3)):
        model = tiny_model()
        torch.manual_seed(11)
        out = loss_fn(model, x, y, epoch=0)
        out.loss.backward()
        losses.append(out.loss.detach())
        gradients.append(grads(model))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adre_reg_loss_sign_pushes_runner_up_down():
    """d loss / d log G^yhat = +lam / B > 0: descending the loss lowers the runner-up's smoothed score."""
    logits = torch.randn(B, 2, K, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.randint(K, (B,), generator=torch.Generator().manual_seed(1))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, K), y.repeat_interleave(2), reduction="none")
    loss_with, _, _ = adre_reg_loss(logits, y, ce.view(B, 2), lam=1.0, per_loss="mean")
    loss_without, _, l_adre = adre_reg_loss(logits, y, ce.view(B, 2), lam=0.0, per_loss="mean")
    torch.testing.assert_close(loss_with, loss_without - l_adre)


def test_per_loss_single_uses_one_draw_per_example():
    per_draw_ce = torch.rand(B, 4, requires_grad=True)
    logits = torch.randn(B, 4, K)
    torch.manual_seed(0)
    loss, _, _ = adre_reg_loss(logits, torch.zeros(B, dtype=torch.long), per_draw_ce, lam=0.0,
                               per_loss="single")
    (grad,) = torch.autograd.grad(loss, per_draw_ce)
    # exactly one draw per example carries the weight 1/B of the batch mean
    assert torch.equal((grad != 0).sum(dim=1), torch.ones(B, dtype=torch.long))
    torch.testing.assert_close(grad.sum(dim=1), torch.full((B,), 1.0 / B))


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_finite_for_very_confident_logits(name):
    model, (x, y) = tiny_model(scale=1e4), batch()
    loss_fn = build_loss(name, sigma=0.25, k=3, lam=1.0, epsilon=0.5, steps=2)
    torch.manual_seed(0)
    out = loss_fn(model, x, y, epoch=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.l_adre)
    assert all(torch.isfinite(g).all() for g in grads(model))


def test_correct_counts_first_draw():
    """A model that ignores its input and always predicts class 2: correct = #(y == 2)."""

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(inputs.shape[0], K) + 0 * inputs.flatten(1)[:, :1]

    x, _ = batch()
    y = torch.tensor([2, 2, 0, 1, 2, 4])
    for name in LOSSES:
        out = build_loss(name, sigma=0.25, k=2, epsilon=0.1)(Constant(), x, y, epoch=0)
        assert int(out.correct) == 3, name


# ---------------------------------------------------------------- SmoothAdv / ADRE_ADV


def test_adre_adv_lambda_zero_equals_smoothadv():
    x, y = batch()
    results = []
    for loss_fn in (AdreAdvLoss(sigma=0.25, k=3, lam=0.0, epsilon=0.5, steps=3),
                    SmoothAdvLoss(sigma=0.25, k=3, epsilon=0.5, steps=3)):
        model = tiny_model()
        torch.manual_seed(3)
        out = loss_fn(model, x, y, epoch=0)
        out.loss.backward()
        results.append((out.loss.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_smoothadv_loss_is_mean_noisy_ce_at_attack_point_with_same_noise(monkeypatch):
    model, (x, y) = tiny_model(), batch()
    seen = {}
    original = smoothadv_module.pgd_l2_smoothed

    def spy(model_, x_, y_, noise_, **kwargs):
        seen["noise"], seen["kwargs"] = noise_.clone(), kwargs
        seen["x_adv"] = original(model_, x_, y_, noise_, **kwargs)
        return seen["x_adv"]

    monkeypatch.setattr(smoothadv_module, "pgd_l2_smoothed", spy)
    out = SmoothAdvLoss(sigma=0.25, k=2, epsilon=0.5, steps=2)(model, x, y, epoch=0)
    assert seen["kwargs"] == {"epsilon": 0.5, "steps": 2, "lam": 0.0}
    noisy = (seen["x_adv"].unsqueeze(1) + seen["noise"]).reshape(-1, C, H, W)
    expected = torch.nn.functional.cross_entropy(model(noisy), y.repeat_interleave(2))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("cls,module", [(SmoothAdvLoss, smoothadv_module), (AdreAdvLoss, adre_adv_module)])
def test_epsilon_warmup(cls, module, monkeypatch):
    loss_fn = cls(sigma=0.25, k=1, epsilon=0.5, steps=1, warmup_epochs=4)
    # eps_epoch = eps * min(1, (epoch + 1) / warmup_epochs)
    assert [loss_fn.epsilon_at(e) for e in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert cls(sigma=0.25, epsilon=0.5, warmup_epochs=0).epsilon_at(0) == 0.5
    used = []
    original = module.pgd_l2_smoothed

    def spy(*args, **kwargs):
        used.append(kwargs["epsilon"])
        x_adv = original(*args, **kwargs)
        assert (x_adv - args[1]).flatten(1).norm(dim=1).max() <= kwargs["epsilon"] + 1e-5
        return x_adv

    monkeypatch.setattr(module, "pgd_l2_smoothed", spy)
    model, (x, y) = tiny_model(), batch()
    outs = [loss_fn(model, x, y, epoch=e) for e in (0, 2, 7)]
    assert used == [0.125, 0.375, 0.5] == [out.epsilon for out in outs]


def test_adre_adv_attack_uses_lambda_and_loss_is_adre_reg_at_attack_point(monkeypatch):
    model, (x, y) = tiny_model(), batch()
    seen = {}
    original = adre_adv_module.pgd_l2_smoothed

    def spy(model_, x_, y_, noise_, **kwargs):
        seen["noise"], seen["kwargs"] = noise_.clone(), kwargs
        seen["x_adv"] = original(model_, x_, y_, noise_, **kwargs)
        return seen["x_adv"]

    monkeypatch.setattr(adre_adv_module, "pgd_l2_smoothed", spy)
    out = AdreAdvLoss(sigma=0.25, k=3, lam=0.4, epsilon=0.5, steps=2)(model, x, y, epoch=0)
    assert seen["kwargs"] == {"epsilon": 0.5, "steps": 2, "lam": 0.4}
    expected = reference_adre_reg(model, seen["x_adv"], y, seen["noise"], 0.4)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- build_loss


def test_build_loss_registry_and_knobs():
    assert tuple(LOSS_REGISTRY) == LOSSES
    loss = build_loss("adre_adv", sigma=0.5, k=4, lam=0.2, per_loss="single", epsilon=1.0, steps=3,
                      warmup_epochs=10, label_smoothing=0.1)
    assert isinstance(loss, AdreAdvLoss)
    assert (loss.sigma, loss.k, loss.lam, loss.per_loss, loss.epsilon, loss.steps, loss.warmup_epochs,
            loss.label_smoothing) == (0.5, 4, 0.2, "single", 1.0, 3, 10, 0.1)
    assert isinstance(build_loss("gaussian", sigma=0.25, lam=0.3), GaussianLoss)  # unused knob ignored
    assert isinstance(build_loss("smoothadv", sigma=0.25), SmoothAdvLoss)
    assert isinstance(build_loss("adre_reg", sigma=0.25), AdreRegLoss)


def test_label_smoothing_applies_to_per_draw_ce():
    model, (x, y) = tiny_model(), batch()
    torch.manual_seed(0)
    out = build_loss("gaussian", sigma=0.25, label_smoothing=0.2)(model, x, y, epoch=0)
    torch.manual_seed(0)
    noisy = x + 0.25 * torch.randn(B, 1, C, H, W).squeeze(1)
    expected = torch.nn.functional.cross_entropy(model(noisy), y, label_smoothing=0.2)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("field,value", [
    ("sigma", 0.0), ("sigma", -1.0), ("sigma", float("nan")), ("k", 0), ("k", 1.5), ("lam", -0.1),
    ("epsilon", -0.5), ("steps", 0), ("per_loss", "median"), ("warmup_epochs", -1),
    ("label_smoothing", 1.0),
])
def test_build_loss_rejects_bad_values(field, value):
    kwargs = {"sigma": 0.25, field: value}
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r}:")):
        build_loss("adre_adv", **kwargs)


def test_build_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match="loss='macer'"):
        build_loss("macer", sigma=0.25)
