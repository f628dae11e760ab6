"""The training job in bf16 + channels_last on CPU workers (issue 24): it trains, records the resolved
precision (MLflow param, checkpoint), and a resume in fp32 is refused before anything is trained."""

from __future__ import annotations

import math
import warnings

import pytest

from adre_ray.config import load_config
from adre_ray.config.train import TrainConfig
from adre_ray.distributed.train import CHECKPOINT_PREFIX, latest_checkpoint, run_training


def _config(cifar10_dir, storage, precision: str, epochs: int) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "model=small_cnn", "batch_size=32", f"data.data_dir={cifar10_dir}", "data.source=parquet",
        "data.train_subset=64", "data.test_subset=32", "data.loader_workers=0", "loss.name=adre_reg",
        "loss.k=2", "loss.lam=0.1", "optim.lr=0.05", f"schedule.epochs={epochs}", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", "run.name=bf16-cpu", f"run.storage_path={storage}",
        "run.experiment=test-precision", f"run.precision={precision}", "run.channels_last=true",
    ])


@pytest.mark.slow
def test_cpu_bf16_training_records_precision_and_refuses_an_fp32_resume(ray_cluster, mlflow_uri, cifar10_dir,
                                                                        tmp_path):
    from mlflow.tracking import MlflowClient

    from adre_ray.models import load_model_checkpoint

    storage = tmp_path / "runs"
    with warnings.catch_warnings():  # a CPU without native bf16 is told that it is emulated
        warnings.simplefilter("ignore", UserWarning)
        first = run_training(_config(cifar10_dir, storage, "bf16", epochs=1))
    for key in ("loss", "l_per", "l_adre", "test_acc_noise"):
        assert math.isfinite(first.metrics[key]), key
    params = MlflowClient(tracking_uri=mlflow_uri).get_run(first.mlflow_run_id).data.params
    assert params["run.precision"] == "bf16" and "run.amp" not in params
    _, meta = load_model_checkpoint(first.checkpoint_path)
    assert meta["extra"]["precision"] == "bf16"

    with pytest.raises(ValueError, match=r"precision='fp32' differs from the run being resumed .* "
                                         r"precision='bf16'"):
        run_training(_config(cifar10_dir, storage, "fp32", epochs=2))
    assert latest_checkpoint(f"{storage}/bf16-cpu").path.endswith(f"{CHECKPOINT_PREFIX}000000")
