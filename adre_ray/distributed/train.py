"""Training as DDP under Ray Train: ``adre-ray train --config FILE --set loss.lam=0.2``.

``train_loop_per_worker(config)`` is a plain function of a config dict, run by every Ray Train worker:
it rebuilds the :class:`TrainConfig`, trains with ``adre_ray.training`` (per-worker shard of the data
through a ``DistributedSampler``, gradients all-reduced by DDP), evaluates under noise after each epoch
and reports metrics and a checkpoint to Ray Train. Scaling, storage and failure handling are declared in
``ScalingConfig`` / ``RunConfig`` / ``FailureConfig`` by :func:`build_trainer`.

Reproducibility and resume: the RNG of rank r in epoch e is seeded with (seed, e, r), and the data order
by (seed, e), so an epoch is a function of the weights and optimizer state it starts from. A checkpoint
holds ``model.pt`` (adre_ray.models format) and ``train_state.pt`` (optimizer, scheduler, epoch; tensors
and primitives only). Re-running with the same ``run.name`` and ``run.storage_path`` restores the run:
Ray Train V2 (the default in Ray 2.60) reloads the run's checkpoint state from storage, and the driver
also finds the newest ``checkpoint_epoch_*`` folder and passes it in the loop config (``resume_from``;
V2 has no ``resume_from_checkpoint`` and V1 does not restore by name), which the loop loads when Ray
Train offers no checkpoint of its own. Training continues after the last finished epoch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adre_ray import storage
from adre_ray.analysis.output_folder import check_output_dir
from adre_ray.config import flatten, load_config
from adre_ray.config.base import effective_precision
from adre_ray.config.flags import SuggestingParser, config_reference
from adre_ray.config.train import TrainConfig
from adre_ray.distributed._common import (
    ADDRESS_HELP,
    connect_ray,
    interrupted,
    is_local_storage,
    ray_storage,
    resolve_storage_path,
    train_v2_enabled,
)
from adre_ray.distributed.cluster import (
    CapacityWatch,
    ClusterCapacityError,
    check_cluster_paths,
    cluster_facts,
    controller_failure_limit,
)
from adre_ray.distributed.faults import FaultKill, fault_worker_env
from adre_ray.precision import (
    autocast_dtype,
    precision_params,
    refuse_mixed_precision,
    resolve_precision,
    warn_if_emulated,
)
from adre_ray.tracking import (
    DISABLED,
    log_artifact,
    log_config,
    log_metrics,
    mlflow_run,
    resolve_tracking_uri,
)

TRAIN_CONFIG_KEY = "train_config"
MLFLOW_RUN_ID_KEY = "mlflow_run_id"
TRACKING_URI_KEY = "tracking_uri"
RESUME_FROM_KEY = "resume_from"
LOADER_KEY = "loader"
IMPORT_PATHS_KEY = "import_paths"
"""Loop-config key: the driver's working directory, put on each worker's ``sys.path`` for ``model_fn``."""
"""Loop-config key: the resolved training input, ``ray_data`` or ``torch`` (:func:`build_trainer` sets it)."""
RESERVED_KEYS = (TRAIN_CONFIG_KEY, MLFLOW_RUN_ID_KEY, TRACKING_URI_KEY, RESUME_FROM_KEY, LOADER_KEY,
                 IMPORT_PATHS_KEY)
TRAIN_STATE_FILENAME = "train_state.pt"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
RUN_PATH_TAG = "adre_ray.train_path"
EPOCH_METRICS = ("epoch", "l_per", "l_adre", "loss", "train_acc_noise", "test_acc_noise", "test_acc_clean",
                 "epoch_time_s", "images_per_s", "images_per_s_total", "lr", "epsilon")
@dataclass(frozen=True)
class TrainResult:
    """Where the trained model is: the final checkpoint folder (holding model.pt), its MLflow run, and the
    last epoch's metrics (empty when there was nothing left to train)."""

    checkpoint_path: str
    mlflow_run_id: str
    metrics: dict[str, Any]


# -- the loop every Ray Train worker runs -------------------------------------------------------------


def config_from_loop_config(config: Mapping[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` in ``config["train_config"]`` with every other non-reserved key applied as a
    dotted override (so Ray Tune can search ``{"loss.lam": tune.grid_search([...])}``)."""
    if TRAIN_CONFIG_KEY not in config:
        raise ValueError(f"config keys={sorted(config)}: missing {TRAIN_CONFIG_KEY!r}")
    cfg = TrainConfig.from_dict(config[TRAIN_CONFIG_KEY])
    overrides = {key: value for key, value in config.items() if key not in RESERVED_KEYS}
    return cfg.replace(**overrides) if overrides else cfg


def rng_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A distinct non-negative seed per (seed, epoch >= -1, rank < 4096, stream in {0: train, 1: eval})."""
    return ((seed * 1_000_003 + epoch + 1) * 4_096 + rank) * 2 + stream


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    """torch / numpy / random RNGs of rank ``rank`` in ``epoch``, as a function of (seed, epoch, rank)."""
    import random

    import numpy as np
    import torch

    value = rng_seed(seed, epoch, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def _all_reduce_sum(values: list[float], device: Any, world_size: int) -> list[float]:
    """Element-wise sum over the workers (identity with one worker)."""
    if world_size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _broadcast_buffers(model: Any, world_size: int) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank; weights already agree (DDP)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def _load_train_checkpoint(directory: Path, model: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Load ``model.pt`` weights into ``model``; return the ``train_state.pt`` dict (weights-only load)."""
    import torch

    from adre_ray.data import dataset_info
    from adre_ray.models import load_model_checkpoint
    from adre_ray.models.model_fn import model_fn_identity

    if cfg.model_fn is not None:
        restored, _meta = load_model_checkpoint(directory, expected_model=model_fn_identity(cfg.model_fn))
    else:
        restored, _meta = load_model_checkpoint(directory, expected_model=cfg.model,
                                                expected_num_classes=dataset_info(cfg.data.dataset).num_classes)
    model.load_state_dict(restored.state_dict())
    state_file = directory / TRAIN_STATE_FILENAME
    if not state_file.is_file():
        raise ValueError(f"checkpoint={str(directory)!r}: no {TRAIN_STATE_FILENAME} to resume from")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def _save_train_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any, *, cfg: TrainConfig,
                           epoch: int, metrics: Mapping[str, Any], mlflow_run_id: str) -> None:
    import torch

    from adre_ray.data import dataset_info
    from adre_ray.models import save_model_checkpoint
    from adre_ray.models.checkpoint import save_model_fn_checkpoint

    extra = {"config": cfg.to_dict(), "mlflow_run_id": mlflow_run_id, "epoch": epoch,
             "sigma": cfg.loss.sigma, "loss": cfg.loss.name, "metrics": dict(metrics),
             "precision": train_precision(cfg)}
    if cfg.model_fn is not None:  # the checkpoint records the spec; certify rebuilds the module from it
        save_model_fn_checkpoint(directory, model, cfg.model_fn, num_classes=None, dataset=cfg.data.dataset,
                                 extra=extra)
    else:
        save_model_checkpoint(directory, model, model_name=cfg.model,
                              num_classes=dataset_info(cfg.data.dataset).num_classes,
                              dataset=cfg.data.dataset, extra=extra)
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, directory / TRAIN_STATE_FILENAME)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train ``TrainConfig`` ``config["train_config"]`` on this Ray Train worker (see the module docstring).

    Reports once per epoch, from every rank: ``epoch`` (0-based), ``l_per``, ``l_adre``, ``loss``,
    ``train_acc_noise`` (means over all workers' images), ``test_acc_noise`` / ``test_acc_clean`` (the
    test subset, split over the workers, counts summed), ``epoch_time_s``, ``images_per_s`` (training
    images per second of one worker, mean over workers), ``images_per_s_total`` (summed), ``lr``,
    ``epsilon``. Rank 0 attaches the checkpoint and logs the same metrics to MLflow run
    ``config["mlflow_run_id"]`` (if any) at step ``epoch``.
    """
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from adre_ray.data import build_dataset, dataset_info
    from adre_ray.device import require_cuda, set_numerics
    from adre_ray.models import build_model
    from adre_ray.models.model_fn import add_import_paths, build_model_fn
    from adre_ray.training import (
        build_loss,
        build_optimizer,
        build_scheduler,
        evaluate_under_noise,
        train_one_epoch,
    )
    from adre_ray.training.certified_validation import run_validation
    from adre_ray.training.compiled import training_modules

    cfg = config_from_loop_config(config)
    fault = FaultKill.from_env()  # the one test hook: None unless a fault-tolerance test asked for a crash
    if not cfg.run.verbose:
        _quiet_ray_train_reports()
    mlflow_run_id = str(config.get(MLFLOW_RUN_ID_KEY) or "")
    tracking_uri = str(config.get(TRACKING_URI_KEY) or DISABLED)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.scaling.use_gpu:  # never train on the CPU when GPUs were asked for
        require_cuda("adre-ray train")
    on_gpu = device.type == "cuda"
    set_numerics(device, deterministic=cfg.run.deterministic)  # cuDNN autotuning on GPU (fixed shapes)
    if not on_gpu:
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    precision = resolve_precision(cfg.run.precision_setting, device)
    amp_dtype = autocast_dtype(precision)
    _seed_everything(cfg.run.seed, -1, 0)  # identical initial weights on every rank

    # data: each worker trains on its DistributedSampler shard (or its Ray Data shard) and evaluates a
    # strided test shard
    data = cfg.data
    batch = cfg.per_worker_batch_size
    loader_kwargs: dict[str, Any] = dict(num_workers=data.loader_workers, pin_memory=on_gpu,
                                         persistent_workers=data.loader_workers > 0)
    test_loader: Any = None
    if config.get(LOADER_KEY) == "ray_data":  # adre_ray.distributed.ingest: batches streamed by Ray Data
        from adre_ray.distributed.ingest import worker_loaders

        epoch_loader, steps_per_epoch, test_loader = worker_loaders(cfg, rank=rank, world_size=world_size,
                                                                    device=device)
        if not storage.is_remote(data.data_dir):  # a local test split: the torch loader's seeded subset
            test_set = build_dataset(data.dataset, data.data_dir, "test", source=data.source, augment=False,
                                     subset=data.test_subset, subset_seed=data.subset_seed)
    else:
        first_on_node = context.get_local_rank() == 0
        download_barrier = data.download and world_size > 1  # the first worker of each node downloads alone
        if download_barrier and not first_on_node:
            torch.distributed.barrier()
        train_set = build_dataset(data.dataset, data.data_dir, "train", source=data.source,
                                  augment=data.augment, subset=data.train_subset,
                                  subset_seed=data.subset_seed, download=data.download)
        test_set = build_dataset(data.dataset, data.data_dir, "test", source=data.source, augment=False,
                                 subset=data.test_subset, subset_seed=data.subset_seed,
                                 download=data.download)
        if download_barrier and first_on_node:
            torch.distributed.barrier()
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=cfg.run.seed, drop_last=False)
        if len(sampler) < batch:
            raise ValueError(f"batch_size={cfg.batch_size}: each of {world_size} workers gets {len(sampler)} "
                             f"training images, fewer than its batch of {batch}")
        train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                                  **loader_kwargs)
        train_loader = ray.train.torch.prepare_data_loader(train_loader)  # keeps our sampler, moves to device

        def epoch_loader(epoch: int) -> Any:
            sampler.set_epoch(epoch)
            return train_loader

        steps_per_epoch = len(sampler) // batch
    if test_loader is None:
        test_shard = Subset(test_set, range(rank, len(test_set), world_size))  # type: ignore[arg-type]
        test_loader = DataLoader(test_shard, batch_size=batch, shuffle=False, **loader_kwargs)
    if cfg.run.train_max_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.run.train_max_batches)

    # model, optimizer, schedule; weights restored before DDP wraps (DDP broadcasts rank 0's anyway)
    add_import_paths([*config.get(IMPORT_PATHS_KEY, []), os.getcwd()])
    model = (build_model_fn(cfg.model_fn).train() if cfg.model_fn is not None
             else build_model(cfg.model, dataset_info(data.dataset).num_classes, data.dataset))
    checkpoint = ray.train.get_checkpoint()  # this run's latest (after a failure or a restored run)
    resume_source = "Ray Train run state"
    if checkpoint is None and config.get(RESUME_FROM_KEY):
        checkpoint, resume_source = ray.train.Checkpoint(str(config[RESUME_FROM_KEY])), "resume_from"
    train_state: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            train_state = _load_train_checkpoint(Path(directory), model, cfg)
    channels_last = cfg.run.channels_last  # on CPU too (oneDNN's NHWC kernels)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.scaling.sync_batchnorm and ray.train.get_context().get_world_size() > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    # DDP first, compile after (gradient all-reduce overlaps the backward); evaluation has its own module
    ddp_model, eval_model = training_modules(model, ray.train.torch.prepare_model, compile=cfg.run.compile)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay,
                                cfg.optim.nesterov, decay_norm_and_bias=cfg.optim.decay_norm_and_bias)
    s = cfg.schedule
    scheduler = build_scheduler(optimizer, s.name, epochs=s.epochs, steps_per_epoch=steps_per_epoch,
                                warmup_epochs=s.warmup_epochs, step_size=s.step_size, gamma=s.gamma)
    start_epoch = 0
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        start_epoch = int(train_state["epoch"]) + 1
        if rank == 0:
            _say(f"[adre-ray train] resuming after epoch {start_epoch - 1} "
                 f"({resume_source}: {checkpoint.path})")  # type: ignore[union-attr]
    loss = cfg.loss
    loss_fn = build_loss(loss.name, sigma=loss.sigma, k=loss.k, lam=loss.lam, per_loss=loss.per_loss,
                         epsilon=loss.epsilon, steps=loss.steps, warmup_epochs=loss.warmup_epochs,
                         label_smoothing=loss.label_smoothing)
    # eval_model: the local module (evaluation shards differ in size, so no DDP collectives there)

    for epoch in range(start_epoch, cfg.schedule.epochs):
        _seed_everything(cfg.run.seed, epoch, rank)
        train_loader = epoch_loader(epoch)
        loader = train_loader if fault is None else fault.wrap(train_loader, epoch=epoch, rank=rank)
        train_stats = train_one_epoch(ddp_model, loader, loss_fn, optimizer, scheduler, device=device,
                                      epoch=epoch, amp_dtype=amp_dtype, max_batches=cfg.run.train_max_batches,
                                      progress=cfg.run.progress and rank == 0, channels_last=channels_last)
        _broadcast_buffers(model, world_size)  # every rank evaluates exactly the model rank 0 checkpoints
        eval_stats = evaluate_under_noise(eval_model, test_loader, loss.sigma, device=device,
                                          amp_dtype=amp_dtype, max_batches=cfg.run.eval_max_batches,
                                          seed=rng_seed(cfg.run.seed, epoch, rank, stream=1),
                                          channels_last=channels_last, fixed_shape=cfg.run.compile)
        epoch_time = train_stats["time_s"] + eval_stats["time_s"]
        n_train, n_test = train_stats["images"], eval_stats["images"]
        sums = _all_reduce_sum([train_stats["loss"] * n_train, train_stats["l_per"] * n_train,
                                train_stats["l_adre"] * n_train, train_stats["train_acc_noise"] * n_train,
                                n_train, eval_stats["acc_noise"] * n_test if n_test else 0.0,
                                eval_stats["acc_clean"] * n_test if n_test else 0.0, n_test,
                                train_stats["images_per_s"], epoch_time], device, world_size)
        (loss_sum, l_per_sum, l_adre_sum, correct_train, images, correct_noise, correct_clean, test_images,
         speed_sum, time_sum) = sums
        metrics = {
            "epoch": epoch,
            "l_per": l_per_sum / images,
            "l_adre": l_adre_sum / images,
            "loss": loss_sum / images,
            "train_acc_noise": correct_train / images,
            "test_acc_noise": correct_noise / test_images if test_images else math.nan,
            "test_acc_clean": correct_clean / test_images if test_images else math.nan,
            "epoch_time_s": time_sum / world_size,
            "images_per_s": speed_sum / world_size,
            "images_per_s_total": speed_sum,
            "lr": train_stats["lr"],
            "epsilon": train_stats["epsilon"],
            "train_images": images,
            "test_images": test_images,
        }
        if cfg.validation.enabled and epoch == cfg.schedule.epochs - 1:  # approx certified accuracy
            metrics.update(run_validation(eval_model, cfg.validation, cfg.data, loss.sigma, rank=rank,
                                          world_size=world_size, amp_dtype=amp_dtype,
                                          channels_last=channels_last))
        with tempfile.TemporaryDirectory(prefix="adre_ckpt_") as tmp:
            ray_checkpoint = None
            if rank == 0:
                _save_train_checkpoint(Path(tmp), model, optimizer, scheduler, cfg=cfg, epoch=epoch,
                                       metrics=metrics, mlflow_run_id=mlflow_run_id)
                ray_checkpoint = ray.train.Checkpoint.from_directory(tmp)
                _log_epoch(metrics, mlflow_run_id, tracking_uri)
            ray.train.report(metrics, checkpoint=ray_checkpoint,
                             checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:06d}")


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every report of every rank at INFO through a logger named after its file, which
    ``LoggingConfig(log_level=...)`` does not reach; raise that logger to WARNING in this worker."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as v2_context
    except ImportError:
        return
    logging.getLogger(v2_context.__file__).setLevel(logging.WARNING)


def _say(message: str) -> None:
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


def _log_epoch(metrics: Mapping[str, Any], mlflow_run_id: str, tracking_uri: str) -> None:
    """One summary line, and the metrics into the driver's MLflow run (a tracking error never stops
    training)."""
    _say("[adre-ray train] epoch {epoch}: loss {loss:.4f} l_per {l_per:.4f} l_adre {l_adre:.4f} "
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


# -- the driver ---------------------------------------------------------------------------------------


def default_run_name(cfg: TrainConfig) -> str:
    """``<model>_<loss>_<YYYYmmdd-HHMMSS>`` (a fresh run each time)."""
    model = cfg.model_fn.rsplit(":", 1)[-1] if cfg.model_fn is not None else cfg.model
    return f"{model}_{cfg.loss.name}_{time.strftime('%Y%m%d-%H%M%S')}"


def latest_checkpoint(run_path: str) -> Any | None:
    """The most recently written complete checkpoint folder (``checkpoint_*`` holding ``train_state.pt``)
    under ``run_path``, at any depth, on local or cloud storage, as a ``ray.train.Checkpoint``; or None.

    Ordered by the write time of ``train_state.pt``: V2 names folders ``checkpoint_epoch_NNNNNN``, V1
    numbers them per attempt (``<trial>/checkpoint_NNNNNN``), so names alone do not order them.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    try:
        fs, root = storage.resolve(run_path) if "://" in run_path else (pafs.LocalFileSystem(), run_path)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, ValueError):
        return None
    states = [info for info in infos
              if info.type == pafs.FileType.File and info.base_name == TRAIN_STATE_FILENAME
              and info.path.rsplit("/", 2)[-2].startswith("checkpoint_")]
    if not states:
        return None
    newest = max(states, key=lambda info: (info.mtime_ns or 0, info.path))
    return Checkpoint(path=newest.path.rsplit("/", 1)[0], filesystem=fs)


def build_trainer(cfg: TrainConfig, *, run_name: str | None = None,
                  extra_loop_config: Mapping[str, Any] | None = None,
                  resume_from: str | None = None) -> Any:
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` as declared by ``cfg``.

    ScalingConfig(num_workers, use_gpu, resources_per_worker={CPU, GPU}), RunConfig(name, absolute
    storage_path, keep ``run.checkpoints_to_keep`` checkpoints, FailureConfig(max_failures)), backend
    nccl on GPU and gloo on CPU. ``extra_loop_config`` is merged into the loop's config dict (MLflow run
    id, tracking URI, or dotted overrides). ``resume_from`` (a checkpoint folder path or URI) is where
    training starts when Ray Train has no checkpoint of this run. With ``$ADRE_RAY_FAULT_KILL`` set (tests
    only), the workers get it through ``worker_runtime_env`` (:class:`FaultKill`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    name = run_name or cfg.run.name or default_run_name(cfg)
    scaling = cfg.scaling
    resources: dict[str, float] = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        resources["GPU"] = float(scaling.gpus_per_worker)
    from adre_ray.distributed.ingest import build_data_config, build_ray_datasets, resolve_loader

    loader = resolve_loader(cfg)
    loop_config = {TRAIN_CONFIG_KEY: cfg.to_dict(), **dict(extra_loop_config or {}), LOADER_KEY: loader,
                   IMPORT_PATHS_KEY: [os.getcwd()]}
    data_kwargs: dict[str, Any] = {}
    if loader == "ray_data":  # Parquet streamed by Ray Data, decoded in CPU tasks
        datasets = build_ray_datasets(cfg)
        data_kwargs = dict(datasets=datasets, dataset_config=build_data_config(cfg, datasets))
    if resume_from is not None:
        loop_config[RESUME_FROM_KEY] = str(resume_from)
    run_kwargs: dict[str, Any] = dict(
        name=name, storage_path=resolve_storage_path(cfg.run.storage_path),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures, **_start_failure_limit(cfg)))
    scaling_kwargs: dict[str, Any] = dict(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                          resources_per_worker=resources)
    fault_env = fault_worker_env(f"{run_kwargs['storage_path'].rstrip('/')}/{name}")
    worker_env = dict(fault_env)
    if storage.is_remote(run_kwargs["storage_path"]):  # honours $AWS_ENDPOINT_URL(_S3) like certify does
        run_kwargs.update(ray_storage(run_kwargs["storage_path"]))
        worker_env.update(storage.storage_env())  # workers upload checkpoints with the driver's settings
    if worker_env:
        run_kwargs["worker_runtime_env"] = {"env_vars": worker_env}
    if train_v2_enabled():  # Ray Train's own INFO lines (one per report and rank) only when verbose
        from ray.train import LoggingConfig

        run_kwargs["logging_config"] = LoggingConfig(log_level="INFO" if cfg.run.verbose else "WARNING")
    else:  # V1: no per-report result tables; the trainer actor only coordinates, so it reserves no CPU
        run_kwargs["verbose"] = 1 if cfg.run.verbose else 0
        scaling_kwargs["trainer_resources"] = {"CPU": 0}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(**scaling_kwargs),
        run_config=RunConfig(**run_kwargs),
        **data_kwargs,
    )


def _start_failure_limit(cfg: TrainConfig) -> dict[str, int]:
    """V2: worker-group start attempts bounded by ``run.resource_wait_s`` (Ray retries them forever by
    default, so a run whose node died and was not replaced would wait without end)."""
    import dataclasses

    from ray.train import FailureConfig

    if not train_v2_enabled() or "controller_failure_limit" not in {f.name for f in
                                                                     dataclasses.fields(FailureConfig)}:
        return {}
    return {"controller_failure_limit": controller_failure_limit(cfg.run.resource_wait_s)}


def _previous_mlflow_run(experiment: str, run_path: str, tracking_uri: str) -> str | None:
    """The MLflow run of an earlier attempt of this Ray run (tag ``adre_ray.train_path``), if any."""
    if tracking_uri == DISABLED:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_PATH_TAG}` = '{run_path}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _checkpoint_uri(checkpoint: Any, run_path: str) -> str:
    """A path a user can pass to ``adre-ray certify``: local absolute path, or the URI for cloud storage."""
    if is_local_storage(run_path):
        return str(checkpoint.path)
    return f"{run_path.rstrip('/')}/{str(checkpoint.path).rstrip('/').rsplit('/', 1)[-1]}"


def _check_local_data(cfg: TrainConfig) -> None:
    """On a local Ray (no cluster address), fail early with a ValueError if the data is not there."""
    if os.environ.get("RAY_ADDRESS") or "://" in cfg.data.data_dir:  # a URI: listed when the trainer is built
        return
    from adre_ray.data import build_dataset, resolve_source

    for split in ("train", "test"):
        data = cfg.data
        if data.dataset == "arrays":  # read and checked (dtypes, NaN / inf, labels) before Ray starts
            build_dataset(data.dataset, data.data_dir, split)
            continue
        source = resolve_source(data.dataset, data.data_dir, split, data.source, data.download)
        if source == "parquet":  # reads footers and labels only: an unreadable file fails here, not in Ray
            build_dataset(data.dataset, data.data_dir, split, source=source)


def localize_paths(cfg: TrainConfig) -> TrainConfig:
    """On a local Ray (no ``$RAY_ADDRESS``), a relative ``data.data_dir`` that exists here is made absolute,
    so workers started in another directory find it. Under ``ray job submit --working-dir``, relative
    paths are left alone: they resolve inside the working directory on every node."""
    data_dir = Path(cfg.data.data_dir).expanduser()
    if os.environ.get("RAY_ADDRESS") or data_dir.is_absolute() or not data_dir.exists():
        return cfg
    return cfg.replace(**{"data.data_dir": str(data_dir.resolve())})


RESUME_MAY_CHANGE: tuple[str, ...] = (
    "schedule.epochs", "scaling.", "data.data_dir", "data.source", "data.download", "data.loader_workers",
    "data.test_subset", "validation.", "run.name", "run.experiment", "run.storage_path", "run.tracking_uri",
    "run.max_failures", "run.checkpoints_to_keep", "run.channels_last", "run.compile",
    "run.eval_max_batches", "run.progress", "run.verbose", "run.deterministic", "run.amp", "run.precision",
    "run.shared_filesystem", "run.resource_wait_s",
)
"""Settings a resumed run may change (a trailing dot: the whole section): more epochs, the resources, where
data and outputs live, evaluation, and speed-only switches. Any other field (model, batch size, loss,
optimizer, the rest of the schedule, seed, training data) would silently mix two trainings in one
run: refused. ``run.precision`` / ``run.amp`` are compared as the RESOLVED precision (fp32 | bf16) instead
(``check_resume_precision``): a bf16 and an fp32 training never mix, whatever the spelling."""


def train_precision(cfg: TrainConfig) -> str:
    """The resolved precision (fp32 | bf16) the workers of ``cfg`` train in (auto: bf16 on GPU workers)."""
    return resolve_precision(cfg.run.precision_setting, "cuda" if cfg.scaling.use_gpu else "cpu")


def stored_train_precision(extra: Mapping[str, Any]) -> str | None:
    """The resolved precision a checkpoint was trained in: recorded (``extra["precision"]``), or derived
    from its stored config (before ``precision`` existed: ``run.amp``, bf16 on GPU only); None if unknown."""
    if extra.get("precision") in ("fp32", "bf16"):
        return str(extra["precision"])
    stored = extra.get("config")
    if not isinstance(stored, Mapping):
        return None
    run, scaling = stored.get("run") or {}, stored.get("scaling") or {}
    setting = effective_precision(run.get("precision", "auto"), run.get("amp"))
    return resolve_precision(setting, "cuda" if scaling.get("use_gpu") else "cpu")


def _flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """``flatten`` with tuples as lists (a stored config holds lists where a live one holds tuples)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in flatten(data).items()}


def check_resume_settings(cfg: TrainConfig, checkpoint: Any, where: str) -> None:
    """``ValueError`` naming the first field that differs between ``cfg`` and the config stored in the
    checkpoint being resumed (``extra["config"]``), unless ``RESUME_MAY_CHANGE`` allows it."""
    from adre_ray.models.checkpoint import read_checkpoint

    with checkpoint.as_directory() as directory:
        extra = read_checkpoint(directory).get("extra") or {}
    refuse_mixed_precision(stored_train_precision(extra), train_precision(cfg), f"checkpoint {where}")
    stored = extra.get("config")
    if not isinstance(stored, Mapping):
        return  # a checkpoint from elsewhere: nothing recorded to compare
    old, new = _flat(stored), _flat(cfg.to_dict())
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUME_MAY_CHANGE) or old.get(key) == new.get(key):
            continue
        raise ValueError(f"{key}={new.get(key)!r} differs from the run being resumed ({key}="
                         f"{old.get(key)!r}, checkpoint {where}); a resumed run may change only "
                         f"{', '.join(RESUME_MAY_CHANGE)}; use a new run.name for other settings")


def check_train_paths(cfg: TrainConfig, tracking_uri: str) -> None:
    """Refuse local ``run.storage_path``, ``data.data_dir`` and a local MLflow store (``tracking_uri``,
    resolved: null means a SQLite file in the working directory) when the workers may run on other
    nodes than the driver and each other, unless ``run.shared_filesystem`` (``cluster.check_cluster_paths``).
    Workers write checkpoints, read the data and log epochs to MLflow, so all three must reach every node."""
    check_cluster_paths({"run.storage_path": cfg.run.storage_path, "data.data_dir": cfg.data.data_dir,
                         "run.tracking_uri": None if tracking_uri == DISABLED else tracking_uri},
                        cluster_facts(), shared_filesystem=cfg.run.shared_filesystem,
                        flag="run.shared_filesystem=true")


def worker_group_needs(cfg: TrainConfig) -> dict[str, float]:
    """CPUs and GPUs of the whole worker group (``scaling``)."""
    s = cfg.scaling
    return {"CPU": s.num_workers * s.cpus_per_worker,
            "GPU": s.num_workers * s.gpus_per_worker if s.use_gpu else 0}


def run_training(cfg: TrainConfig, *, check_data: bool = True) -> TrainResult:
    """Train ``cfg`` on the connected Ray cluster, tracked in MLflow; resume if the run exists.

    Creates (or, for a resumed Ray run, reopens) the MLflow run with the flat config as params, fits the
    trainer (rank 0 logs per-epoch metrics live), then logs ``final_*`` metrics and the final
    checkpoint's ``model.pt`` as artifact ``checkpoint/model.pt``.
    """
    if check_data:
        _check_local_data(cfg)
    cfg = localize_paths(cfg)
    name = cfg.run.name or default_run_name(cfg)
    storage = resolve_storage_path(cfg.run.storage_path)
    run_path = f"{storage.rstrip('/')}/{name}"
    tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
    warn_if_emulated(train_precision(cfg), "cuda" if cfg.scaling.use_gpu else "cpu", "CPU workers")
    check_train_paths(cfg, tracking_uri)
    previous = latest_checkpoint(run_path)
    resume_from = _checkpoint_uri(previous, run_path) if previous is not None else None
    previous_run_id = None
    if resume_from is not None:
        check_resume_settings(cfg, previous, resume_from)
        previous_run_id = _previous_mlflow_run(cfg.run.experiment, run_path, tracking_uri)
    tags = {RUN_PATH_TAG: run_path, "adre_ray.job": "train", "adre_ray.loss": cfg.loss.name,
            "adre_ray.model": cfg.model}
    with mlflow_run(cfg.run.experiment, name, tracking_uri=tracking_uri, run_id=previous_run_id,
                    tags=None if previous_run_id else tags) as run:
        run_id = run.info.run_id
        log_config(precision_params(cfg.flat_dict(), train_precision(cfg), "run."), run_id=run_id or None,
                   tracking_uri=tracking_uri)
        if resume_from is not None:
            print(f"[adre-ray train] resuming run {name!r} from {resume_from}", flush=True)
        trainer = build_trainer(cfg, run_name=name, resume_from=resume_from,
                                extra_loop_config={MLFLOW_RUN_ID_KEY: run_id, TRACKING_URI_KEY: tracking_uri})
        started = time.perf_counter()
        with CapacityWatch(worker_group_needs(cfg), cfg.run.resource_wait_s,
                           "add a node (or lower scaling.num_workers) and re-run the same command: it "
                           f"resumes from the last checkpoint in {run_path}",
                           interrupt=not train_v2_enabled()):
            result = trainer.fit()
            if getattr(result, "error", None) is not None:
                raise result.error
        checkpoint = result.checkpoint or previous  # nothing left to train: the previous one stands
        if checkpoint is None:
            raise RuntimeError(f"run {name!r} finished without a checkpoint (schedule.epochs="
                               f"{cfg.schedule.epochs})")
        metrics = {key: value for key, value in (result.metrics or {}).items() if key in EPOCH_METRICS
                   or key in ("train_images", "test_images")}
        final = {f"final_{key}": value for key, value in metrics.items() if key != "epoch"}
        final["fit_time_s"] = time.perf_counter() - started
        log_metrics(final, step=int(metrics.get("epoch", 0)), run_id=run_id or None,
                    tracking_uri=tracking_uri)
        if tracking_uri != DISABLED:
            with checkpoint.as_directory() as directory:
                log_artifact(Path(directory) / "model.pt", "checkpoint", run_id=run_id,
                             tracking_uri=tracking_uri)
    path = _checkpoint_uri(checkpoint, run_path)
    print(f"[adre-ray train] final checkpoint: {path}" + (f"  (MLflow run {run_id})" if run_id else ""),
          flush=True)
    return TrainResult(checkpoint_path=path, mlflow_run_id=run_id, metrics=metrics)


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="adre-ray train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a base classifier (Gaussian, ADRE_REG, SmoothAdv, ADRE_ADV) as DDP under "
                    "Ray Train, tracked in MLflow.",
        epilog="config keys (YAML file or --set KEY=VALUE):\n" + config_reference(TrainConfig))
    parser.add_argument("--config", help="YAML file with TrainConfig fields (see jobs/configs/train_*.yaml; "
                                         "default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field with a YAML value, e.g. loss.lam=0.2 (repeatable; "
                             "default: none)")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``adre-ray train``: exit 0 on success, 2 on a configuration or data error, 1 when training failed
    (message on stderr), 130 on Ctrl-C (re-running the same command resumes)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(TrainConfig, args.config, args.set)
        if args.address in (None, "local"):
            _check_local_data(cfg)
            check_output_dir(cfg.run.storage_path, "run.storage_path")
    except ValueError as err:
        print(f"adre-ray train: error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    from ray.train import TrainingFailedError

    started = False
    try:
        started = connect_ray(args.address)
        result = run_training(cfg, check_data=False)
    except ValueError as err:
        print(f"adre-ray train: error: {err}", file=sys.stderr)
        return 2
    except ClusterCapacityError as err:  # a node died and none can replace it
        print(f"adre-ray train: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingFailedError as err:  # a worker raised (after run.max_failures restarts)
        print(f"adre-ray train: training failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        return interrupted("train", stop)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"checkpoint: {result.checkpoint_path}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
