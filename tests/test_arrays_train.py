"""Training on arrays datasets (``data.dataset: arrays``, a top-level ``model_fn``): the step of all four
methods on image-shaped (1x7x7) and vector-shaped samples, one Ray Train run, and the checkpoint names its
model_fn spec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from adre_ray.config import load_config
from adre_ray.config.train import TrainConfig
from adre_ray.data.datasets import arrays_dataset
from adre_ray.distributed.train import run_training
from adre_ray.models.checkpoint import load_model_checkpoint
from adre_ray.models.model_fn import build_model_fn
from adre_ray.training import build_optimizer, train_one_epoch
from adre_ray.training.losses import build_loss

SPECS = {"image": ("tests.model_fns:small_mnist_net", (1, 7, 7), 10),
         "vector": ("tests.model_fns:vector_net", (10,), 3)}


def write_split(folder, name: str, shape: tuple[int, ...], classes: int, n: int, seed: int) -> None:
    """Samples in [0, 1] whose class shifts their mean (learnable, so the loss is finite and falls)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = (rng.random((n, *shape)) * 0.5 + (y / classes).reshape(-1, *[1] * len(shape)) * 0.5)
    np.savez(folder / f"{name}.npz", x=x.astype(np.float32), y=y.astype(np.int16))


def arrays_config(data_dir, storage, spec: str, loss: str) -> TrainConfig:
    overrides = [f"model_fn={spec}", "batch_size=32", "data.dataset=arrays", f"data.data_dir={data_dir}",
                 "data.loader_workers=0", f"loss.name={loss}", "loss.k=2", "loss.lam=0.1", "loss.sigma=0.25",
                 "optim.lr=0.05", "schedule.name=step", "schedule.epochs=1", "scaling.num_workers=2",
                 "scaling.cpus_per_worker=1", f"run.name=arrays-{loss}", f"run.storage_path={storage}",
                 "run.tracking_uri=none"]
    if loss in ("smoothadv", "adre_adv"):
        overrides += ["loss.epsilon=0.25", "loss.steps=1"]
    return load_config(TrainConfig, None, overrides)


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("loss", ["gaussian", "adre_reg", "smoothadv", "adre_adv"])
def test_every_method_steps_on_arrays_of_either_shape(tmp_path, loss, kind):
    """The training step of each method on an arrays split as Ray Train's workers read it (no Ray: the
    worker's data and loss path, one epoch)."""
    spec, shape, classes = SPECS[kind]
    write_split(tmp_path, "train", shape, classes, 64, seed=1)
    loader = DataLoader(arrays_dataset(tmp_path, "train"), batch_size=32)
    model = build_model_fn(spec)
    loss_fn = build_loss(loss, sigma=0.25, k=2, lam=0.1, epsilon=0.25, steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, loader, loss_fn, build_optimizer(model, 0.05, 0.9, 0.0), None,
                            device="cpu", epoch=0)
    assert stats["images"] == 64 and stats["batches"] == 2
    assert all(math.isfinite(stats[key]) for key in ("loss", "l_per", "l_adre", "train_acc_noise"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_arrays_train_on_ray_train_and_the_checkpoint_names_its_model_fn(ray_cluster, tmp_path):
    """Two workers on Ray Train, one run: vector samples and the adversarial ADRE loss, the least
    image-like case (every method's step on both sample shapes is checked above without Ray: the
    workers run that same path)."""
    loss = "adre_adv"
    spec, shape, classes = SPECS["vector"]
    write_split(tmp_path, "train", shape, classes, 128, seed=1)
    write_split(tmp_path, "test", shape, classes, 64, seed=2)
    result = run_training(arrays_config(tmp_path, tmp_path / "runs", spec, loss))
    assert result.metrics["train_images"] == 128 and result.metrics["test_images"] == 64
    assert math.isfinite(result.metrics["loss"])
    model, meta = load_model_checkpoint(result.checkpoint_path)
    assert meta["model_fn"] == spec and meta["extra"]["sigma"] == 0.25 and meta["dataset"] == "arrays"


def test_arrays_need_a_model_fn(tmp_path):
    with pytest.raises(ValueError, match=r"model_fn=None: must be set for data.dataset='arrays'"):
        load_config(TrainConfig, None, ["model=small_cnn", "data.dataset=arrays",
                                        f"data.data_dir={tmp_path}"])
