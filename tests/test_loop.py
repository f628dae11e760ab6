"""Schedules, optimizer, train_one_epoch / evaluate_under_noise on a tiny separable task; no Ray import."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adre_ray.config import LOSSES
from adre_ray.training import (
    build_loss,
    build_optimizer,
    build_scheduler,
    evaluate_under_noise,
    train_one_epoch,
)

C, H, W, K = 3, 8, 8, 4


def tiny_model(seed: int = 0, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.BatchNorm2d(C)] if norm else []
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(C * H * W, K))


def separable_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c = 0.5 + 0.25 * (random +-1 prototype c) + small jitter: linearly separable, in [0, 1]."""
    prototypes = torch.randint(0, 2, (K, C, H, W), generator=torch.Generator().manual_seed(123)) * 2.0 - 1
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(K, (n,), generator=g)
    x = (0.5 + 0.25 * prototypes[y] + 0.05 * torch.randn(n, C, H, W, generator=g)).clamp(0, 1)
    return x, y


def loader_of(x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> list[tuple[torch.Tensor, ...]]:
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


# ---------------------------------------------------------------- schedules and optimizer


def lrs_after(scheduler, optimizer, iterations: list[int]) -> dict[int, float]:
    """The lr in effect for iteration i (after i scheduler steps)."""
    out, done = {}, 0
    for target in sorted(iterations):
        while done < target:
            optimizer.step()
            scheduler.step()
            done += 1
        out[target] = optimizer.param_groups[0]["lr"]
    return out


def test_step_schedule_divides_by_ten_every_50_epochs():
    model = tiny_model()
    optimizer = build_optimizer(model, 0.1, 0.9, 1e-4)
    scheduler = build_scheduler(optimizer, "step", epochs=150, steps_per_epoch=3, step_size=50, gamma=0.1)
    spe = 3
    lrs = lrs_after(scheduler, optimizer, [0, 49 * spe + 2, 50 * spe, 99 * spe + 2, 100 * spe, 150 * spe - 1])
    expected = {0: 0.1, 149: 0.1, 150: 0.01, 299: 0.01, 300: 0.001, 449: 0.001}
    assert lrs.keys() == expected.keys()
    for it, lr in expected.items():
        assert lrs[it] == pytest.approx(lr, rel=1e-12), it


def test_cosine_schedule_with_linear_warmup():
    model = tiny_model()
    optimizer = build_optimizer(model, 0.2, 0.9, 0.0)
    # W = 5 epochs * 10 = 50 warm-up iterations, T = 150: lr_i = 0.2 (i + 1) / 50 for i < 50, then
    # 0.2 (1 + cos(pi (i - 50) / 100)) / 2: i = 50 -> 0.2, i = 100 -> 0.1, i = 125 -> 0.2 (1 - 1/sqrt 2)/2
    scheduler = build_scheduler(optimizer, "cosine", epochs=15, steps_per_epoch=10, warmup_epochs=5)
    lrs = lrs_after(scheduler, optimizer, [0, 24, 49, 50, 100, 125, 150])
    expected = {0: 0.2 / 50, 24: 0.2 * 25 / 50, 49: 0.2, 50: 0.2, 100: 0.1,
                125: 0.2 * (1 - math.sqrt(0.5)) / 2, 150: 0.0}
    for it, lr in expected.items():
        assert lrs[it] == pytest.approx(lr, rel=1e-9, abs=1e-15), it


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "linear"}, "schedule='linear'"), ({"epochs": 0}, "epochs=0"),
    ({"steps_per_epoch": 0}, "steps_per_epoch=0"), ({"warmup_epochs": 10}, "warmup_epochs=10"),
    ({"step_size": 0}, "step_size=0"), ({"gamma": 1.5}, "gamma=1.5"),
])
def test_build_scheduler_rejects_bad_values(kwargs, match):
    optimizer = build_optimizer(tiny_model(), 0.1, 0.9, 0.0)
    args = {"name": "step", "epochs": 10, "steps_per_epoch": 5, **kwargs}
    with pytest.raises(ValueError, match=f"^{match}:"):
        build_scheduler(optimizer, args.pop("name"), **args)


def test_build_optimizer_decay_groups_and_validation():
    model = tiny_model(norm=True)
    optimizer = build_optimizer(model, 0.1, 0.9, 5e-4, nesterov=True)
    decayed, plain = optimizer.param_groups
    assert [p.dim() for p in decayed["params"]] == [2] and decayed["weight_decay"] == 5e-4
    assert sorted(p.dim() for p in plain["params"]) == [1, 1, 1] and plain["weight_decay"] == 0.0
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    every = build_optimizer(model, 0.1, 0.9, 5e-4, decay_norm_and_bias=True).param_groups
    assert len(every) == 1 and len(every[0]["params"]) == 4 and every[0]["weight_decay"] == 5e-4
    for args, match in [((0.0, 0.9, 0.0), "lr=0.0"), ((0.1, 1.0, 0.0), "momentum=1.0"),
                        ((0.1, 0.9, -1.0), "weight_decay=-1.0")]:
        with pytest.raises(ValueError, match=f"^{match}:"):
            build_optimizer(model, *args)
    with pytest.raises(ValueError, match="^nesterov=True:"):
        build_optimizer(model, 0.1, 0.0, 0.0, nesterov=True)


# ---------------------------------------------------------------- train / evaluate


@pytest.mark.parametrize("name", LOSSES)
def test_train_one_epoch_learns_separable_task(name):
    torch.set_num_threads(1)
    train = loader_of(*separable_task(256, seed=0))
    test = loader_of(*separable_task(128, seed=1))
    model = tiny_model()
    loss_fn = build_loss(name, sigma=0.5, k=2, lam=0.5, epsilon=0.5, steps=2, warmup_epochs=2)
    optimizer = build_optimizer(model, 0.05, 0.9, 1e-4)
    scheduler = build_scheduler(optimizer, "cosine", epochs=3, steps_per_epoch=len(train))
    before = evaluate_under_noise(model, test, 0.5, device="cpu", seed=0)
    history = [train_one_epoch(model, train, loss_fn, optimizer, scheduler, device="cpu", epoch=e)
               for e in range(3)]
    after = evaluate_under_noise(model, test, 0.5, device="cpu", seed=0)
    first, last = history[0], history[-1]
    # chance level is 1/4; a linear model separates the task at sigma = 0.5 (margin >> noise)
    assert before["acc_noise"] < 0.5 and after["acc_noise"] >= 0.9 and after["acc_clean"] >= 0.9
    assert last["l_per"] < 0.5 * first["l_per"] and last["loss"] < first["loss"]
    assert last["train_acc_noise"] > first["train_acc_noise"] and last["train_acc_noise"] >= 0.9
    if name.startswith("adre"):
        assert last["l_adre"] > first["l_adre"]  # -log G^yhat grows: the runner-up is pushed down
    else:
        assert first["l_adre"] == last["l_adre"] == 0.0
        assert first["loss"] == pytest.approx(first["l_per"])
    expected_eps = [0.25, 0.5, 0.5] if name in ("smoothadv", "adre_adv") else [0.0, 0.0, 0.0]
    assert [h["epsilon"] for h in history] == expected_eps
    assert all(h["images"] == 256 and h["batches"] == 8 and h["images_per_s"] > 0 for h in history)
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine stepped once per batch reaches 0
    assert model.training


def test_train_one_epoch_max_batches_dicts_and_bf16_autocast():
    x, y = separable_task(96, seed=0)
    loader = [{"image": x[i:i + 16], "label": y[i:i + 16]} for i in range(0, 96, 16)]
    model = tiny_model()
    optimizer = build_optimizer(model, 0.05, 0.9, 0.0)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, loader, build_loss("adre_reg", sigma=0.25, k=2, lam=0.1), optimizer, None,
                            device="cpu", epoch=0, amp_dtype=torch.bfloat16, max_batches=2)
    assert stats["images"] == 32 and stats["batches"] == 2
    assert all(math.isfinite(stats[key]) for key in ("loss", "l_per", "l_adre", "train_acc_noise"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="^max_batches=0:"):
        train_one_epoch(model, loader, build_loss("gaussian", sigma=0.25), optimizer, None, device="cpu",
                        epoch=0, max_batches=0)


def test_evaluate_under_noise_counts_and_modes():
    x, y = separable_task(64, seed=3)
    model = tiny_model(norm=True)
    model.train()
    loader = loader_of(x, y, batch_size=16)
    with torch.no_grad():
        clean_predictions = tiny_model(norm=True).eval()(x).argmax(1)
    first = evaluate_under_noise(model, loader, 0.3, device="cpu", seed=7)
    assert model.training  # mode restored
    assert first["acc_clean"] == (clean_predictions == y).float().mean().item()
    assert first == {**evaluate_under_noise(model, loader, 0.3, device="cpu", seed=7),
                     "time_s": first["time_s"], "images_per_s": first["images_per_s"]}  # seeded: same
    zero = evaluate_under_noise(model, loader, 0.0, device="cpu", max_batches=2)
    assert zero["images"] == 32 and zero["acc_noise"] == zero["acc_clean"]
    with pytest.raises(ValueError, match="^sigma=-0.5:"):
        evaluate_under_noise(model, loader, -0.5, device="cpu")
