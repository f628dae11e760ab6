"""A loss is one module: it declares its parameters and registers itself; the trainer builds every loss
the same way. A toy loss defined here (no package edit) trains through the normal config -> build -> step
path."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from test_arrays_train import SPECS, write_split
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader

from adre_ray.config import load_config
from adre_ray.config.train import LossSection, TrainConfig
from adre_ray.data.datasets import arrays_dataset
from adre_ray.models.model_fn import build_model_fn
from adre_ray.training import (
    LOSS_REGISTRY,
    LossFn,
    LossOutput,
    LossParams,
    build_loss,
    build_optimizer,
    loss_from_config,
    loss_names,
    register_loss,
    train_one_epoch,
)
from adre_ray.training.checks import NonNegativeFloat
from adre_ray.training.losses.base import first_draw_correct, noisy_logits


class MarginParams(LossParams):
    """The toy's own parameter, with its rule."""

    margin: NonNegativeFloat = 0.5

    def check_training_use(self, name: str, prefix: str) -> None:
        if self.k < 2:
            raise ValueError(f"{prefix}k={self.k!r}: must be >= 2 for {prefix}name={name!r}")


class NoisyMarginLoss(LossFn):
    """Noisy CE plus ``margin`` times the mean squared logit (a toy, not a method)."""

    name = "toy_margin"
    Params = MarginParams

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> LossOutput:
        logits = noisy_logits(model, x, self.draw_noise(x))
        batch, k, classes = logits.shape
        ce = cross_entropy(logits.reshape(batch * k, classes), y.repeat_interleave(k))
        loss = ce + self.margin * logits.pow(2).mean()
        return LossOutput(loss=loss, l_per=ce.detach(), l_adre=torch.zeros((), device=x.device),
                          correct=first_draw_correct(logits, y), batch_size=batch)


@pytest.fixture
def toy_loss():
    """The toy registered for one test, unregistered after it (the registry is process-wide)."""
    register_loss(NoisyMarginLoss)
    yield NoisyMarginLoss
    LOSS_REGISTRY.pop(NoisyMarginLoss.name)


def test_the_config_section_lists_every_parameter_the_built_in_losses_declare():
    declared = {field for cls in LOSS_REGISTRY.values() for field in cls.Params.model_fields}
    assert {key.name for key in LossSection.config_keys()} == {"name"} | declared


def test_a_registered_toy_loss_builds_validates_and_is_listed(toy_loss):
    assert loss_names()[-1] == "toy_margin"
    loss = build_loss("toy_margin", sigma=0.25, k=2, margin=0.1, lam=0.3)  # lam: another loss's knob
    assert isinstance(loss, NoisyMarginLoss) and (loss.sigma, loss.k, loss.margin) == (0.25, 2, 0.1)
    with pytest.raises(ValueError, match=r"^margin=-1\.0: must be a finite number >= 0"):
        build_loss("toy_margin", sigma=0.25, margin=-1.0)
    with pytest.raises(ValueError, match=r"^lam=-1\.0:"):  # every knob is checked whatever the loss
        build_loss("toy_margin", sigma=0.25, lam=-1.0)


def test_a_taken_name_is_refused(toy_loss):
    clash = type("OtherLoss", (LossFn,), {"name": "toy_margin"})
    with pytest.raises(ValueError, match="loss name 'toy_margin' is taken"):
        register_loss(clash)
    with pytest.raises(TypeError):
        register_loss(object)


def test_the_toy_is_unknown_to_a_config_once_unregistered():
    with pytest.raises(ValueError, match=r"^loss\.name='toy_margin': must be one of gaussian, adre_reg, "):
        load_config(TrainConfig, None, ["loss.name=toy_margin"])


def test_a_toy_loss_trains_through_the_config_and_the_workers_step(toy_loss, tmp_path):
    """Config (loss.name, its training rule) -> ``loss_from_config`` (what every Ray Train worker calls)
    -> one epoch of ``train_one_epoch`` on an arrays split, as test_arrays_train does for the four
    methods."""
    spec, shape, classes = SPECS["image"]
    base = [f"model_fn={spec}", "data.dataset=arrays", f"data.data_dir={tmp_path}", "loss.name=toy_margin",
            "loss.sigma=0.25"]
    with pytest.raises(ValueError, match=r"^loss\.k=1: must be >= 2 for loss\.name='toy_margin'"):
        load_config(TrainConfig, None, [*base, "loss.k=1"])
    cfg = load_config(TrainConfig, None, [*base, "loss.k=2"])
    loss_fn = loss_from_config(cfg.loss)
    assert isinstance(loss_fn, NoisyMarginLoss) and (loss_fn.k, loss_fn.margin) == (2, 0.5)

    write_split(tmp_path, "train", shape, classes, 64, seed=1)
    model = build_model_fn(spec)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, DataLoader(arrays_dataset(tmp_path, "train"), batch_size=32), loss_fn,
                            build_optimizer(model, 0.05, 0.9, 0.0), None, device="cpu", epoch=0)
    assert stats["images"] == 64 and stats["batches"] == 2
    assert all(math.isfinite(stats[key]) for key in ("loss", "l_per", "l_adre", "train_acc_noise"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_toy_loss_with_a_new_parameter_is_configured_by_its_own_params(toy_loss, tmp_path):
    """``loss.margin`` is nowhere in ``adre_ray.config``: the registered toy's ``MarginParams`` declares
    it, and the config reads, checks, records and ships it to the trainer through the loss's own rule."""
    spec = SPECS["image"][0]
    base = [f"model_fn={spec}", "data.dataset=arrays", f"data.data_dir={tmp_path}", "loss.name=toy_margin",
            "loss.k=2"]
    cfg = load_config(TrainConfig, None, [*base, "loss.margin=0.125"])
    assert cfg.loss.margin == 0.125 and cfg.flat_dict()["loss.margin"] == 0.125
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the dict Ray Train workers rebuild it from
    assert loss_from_config(cfg.loss).margin == 0.125
    assert cfg.replace(**{"loss.margin": 2}).loss.margin == 2.0  # a float parameter holds a float
    with pytest.raises(ValueError, match=r"^loss\.margin=-1\.0: must be a finite number >= 0"):
        load_config(TrainConfig, None, [*base, "loss.margin=-1"])
    with pytest.raises(ValueError, match=r"^loss\.margin='wide': must be a finite number >= 0"):
        load_config(TrainConfig, None, [*base, "loss.margin=wide"])
    with pytest.raises(ValueError, match=r"^loss\.margn=0\.1: unknown config key"):
        TrainConfig.from_dict({"loss": {"name": "toy_margin", "margn": 0.1}})
    # another loss's knob is checked by that loss's rule, whatever loss is chosen (as build_loss does)
    with pytest.raises(ValueError, match=r"^loss\.margin=-0\.5: must be a finite number >= 0"):
        load_config(TrainConfig, None, ["loss.name=adre_reg", "loss.margin=-0.5"])


def test_the_toy_parameter_is_listed_in_the_train_help_while_registered(toy_loss):
    from adre_ray.config.flags import config_reference

    assert "loss.margin" in config_reference(TrainConfig)
    assert "loss: gaussian | adre_reg | smoothadv | adre_adv | toy_margin" in config_reference(TrainConfig)


def test_the_built_in_losses_parameters_are_read_without_torch():
    code = ("import sys; from adre_ray.config.train import TrainConfig; "
            "from adre_ray.config.flags import config_reference; "
            "from adre_ray.config.loss import LossSection; "
            "text = config_reference(TrainConfig); "
            "assert 'loss.epsilon' in text and 'loss.per_loss' in text, text; "
            "assert LossSection.model_validate({'name': 'smoothadv', 'epsilon': 0.5}).steps == 1; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_torch_free_declarations_are_the_built_in_losses_params():
    from adre_ray.training.loss_params import BUILT_IN_PARAMS

    assert {name: LOSS_REGISTRY[name].Params for name in BUILT_IN_PARAMS} == BUILT_IN_PARAMS
