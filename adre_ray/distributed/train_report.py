"""What a Ray Train worker does with one finished epoch: sum its statistics over the workers, save the
checkpoint (rank 0), log the metrics to MLflow (rank 0, once per epoch even when an epoch is re-run after
a restart) and report both to Ray Train."""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adre_ray.config.train import TrainConfig
from adre_ray.distributed.train_checkpoint import CHECKPOINT_PREFIX, save_train_checkpoint
from adre_ray.tracking import DISABLED, log_metrics

EPOCH_METRICS = ("epoch", "l_per", "l_adre", "loss", "train_acc_noise", "test_acc_noise", "test_acc_clean",
                 "epoch_time_s", "images_per_s", "images_per_s_total", "lr", "epsilon")


@dataclass(frozen=True)
class Worker:
    """Where this Ray Train worker stands: its rank among ``world_size`` workers and its device."""

    rank: int
    world_size: int
    device: Any


def all_reduce_sum(values: list[float], worker: Worker) -> list[float]:
    """Element-wise sum over the workers (identity with one worker)."""
    if worker.world_size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=worker.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def epoch_metrics(epoch: int, train: Mapping[str, float], test: Mapping[str, float], worker: Worker
                  ) -> dict[str, Any]:
    """The epoch's metrics over all workers: losses and accuracies weighted by each worker's images,
    test accuracies from the summed counts, time and images/s as means (``images_per_s_total``: sum)."""
    n_train, n_test = train["images"], test["images"]
    sums = all_reduce_sum([train["loss"] * n_train, train["l_per"] * n_train, train["l_adre"] * n_train,
                           train["train_acc_noise"] * n_train, n_train,
                           test["acc_noise"] * n_test if n_test else 0.0,
                           test["acc_clean"] * n_test if n_test else 0.0, n_test,
                           train["images_per_s"], train["time_s"] + test["time_s"]], worker)
    (loss_sum, l_per_sum, l_adre_sum, correct_train, images, correct_noise, correct_clean, test_images,
     speed_sum, time_sum) = sums
    return {
        "epoch": epoch,
        "l_per": l_per_sum / images,
        "l_adre": l_adre_sum / images,
        "loss": loss_sum / images,
        "train_acc_noise": correct_train / images,
        "test_acc_noise": correct_noise / test_images if test_images else math.nan,
        "test_acc_clean": correct_clean / test_images if test_images else math.nan,
        "epoch_time_s": time_sum / worker.world_size,
        "images_per_s": speed_sum / worker.world_size,
        "images_per_s_total": speed_sum,
        "lr": train["lr"],
        "epsilon": train["epsilon"],
        "train_images": images,
        "test_images": test_images,
    }


def report_epoch(metrics: Mapping[str, Any], training: Any, cfg: TrainConfig, worker: Worker, *,
                 mlflow_run_id: str, tracking_uri: str) -> None:
    """Rank 0 saves ``training``'s model, optimizer and schedule as the epoch's checkpoint and logs the
    metrics; every rank reports the metrics to Ray Train (rank 0 with the checkpoint)."""
    import ray.train

    epoch = int(metrics["epoch"])
    with tempfile.TemporaryDirectory(prefix="adre_ckpt_") as tmp:
        checkpoint = None
        if worker.rank == 0:
            save_train_checkpoint(Path(tmp), training.model, training.optimizer, training.scheduler, cfg=cfg,
                                  epoch=epoch, metrics=metrics, mlflow_run_id=mlflow_run_id)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            log_epoch(metrics, mlflow_run_id, tracking_uri)
        ray.train.report(dict(metrics), checkpoint=checkpoint,
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:06d}")


def quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every report of every rank at INFO through a logger named after its file, which
    ``LoggingConfig(log_level=...)`` does not reach; raise that logger to WARNING in this worker."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as v2_context
    except ImportError:
        return
    logging.getLogger(v2_context.__file__).setLevel(logging.WARNING)


def say(message: str) -> None:
    """Print once from a Ray Train worker (V2 tees a plain ``print`` to stdout and to its logger)."""
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


def _logged_epochs(mlflow_run_id: str, tracking_uri: str) -> set[int]:
    """Steps of the run's ``epoch`` metric already in MLflow.

    An epoch is logged before the controller has committed its checkpoint, so a crash in between (or a
    stop and resume) re-runs the epoch from the previous checkpoint; checking here keeps one point per
    step however the run was interrupted.
    """
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(mlflow_run_id, "epoch")
    return {int(m.step) for m in history}


def log_epoch(metrics: Mapping[str, Any], mlflow_run_id: str, tracking_uri: str) -> None:
    """One summary line, and the metrics into the driver's MLflow run (a tracking error never stops
    training)."""
    say("[adre-ray train] epoch {epoch}: loss {loss:.4f} l_per {l_per:.4f} l_adre {l_adre:.4f} "
        "train_acc_noise {train_acc_noise:.3f} test_acc_noise {test_acc_noise:.3f} "
        "test_acc_clean {test_acc_clean:.3f} {images_per_s_total:.0f} img/s".format(**metrics))
    if not mlflow_run_id or tracking_uri == DISABLED:
        return
    try:
        if int(metrics["epoch"]) in _logged_epochs(mlflow_run_id, tracking_uri):
            return  # this epoch was re-run after a restart: its first values stand, never a second point
        log_metrics(metrics, step=int(metrics["epoch"]), run_id=mlflow_run_id, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 - tracking is best effort inside the loop
        print(f"[adre-ray train] warning: MLflow logging failed: {err}", file=sys.stderr, flush=True)


__all__ = ["EPOCH_METRICS", "Worker", "all_reduce_sum", "epoch_metrics", "log_epoch",
           "quiet_ray_train_reports", "report_epoch", "say"]
