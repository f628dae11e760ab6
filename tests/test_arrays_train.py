"""Training on arrays datasets (``data.dataset: arrays``, a top-level ``model_fn``): all four methods on
Ray Train, image-shaped (1x7x7) and vector-shaped samples; the checkpoint certifies from its spec."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adre_ray.config import load_config
from adre_ray.config.train import TrainConfig
from adre_ray.distributed.train import run_training
from adre_ray.models.checkpoint import load_model_checkpoint

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


@pytest.mark.parametrize(("loss", "kind"), [("gaussian", "image"), ("adre_reg", "vector"),
                                            ("smoothadv", "image"), ("adre_adv", "vector")])
def test_every_method_trains_on_arrays(ray_cluster, tmp_path, loss, kind):
    spec, shape, classes = SPECS[kind]
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
