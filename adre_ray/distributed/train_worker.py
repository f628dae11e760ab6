"""The loop every Ray Train worker runs: ADRE Algorithm 1 under DDP.

``train_loop_per_worker(config)`` is a plain function of a loop-config dict: it rebuilds the
:class:`TrainConfig`, reads its shard of the data (a ``DistributedSampler`` or its Ray Data shard), builds
or restores the model, optimizer and schedule, and then, per epoch: seeds its RNGs with (seed, epoch,
rank), trains with the configured loss (gradients all-reduced by DDP), evaluates under noise, and
reports the metrics summed over the workers with a checkpoint (``train_report``). Restoring is in
``train_checkpoint``, the epoch's report and MLflow logging in ``train_report``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adre_ray import storage
from adre_ray.config.train import TrainConfig
from adre_ray.distributed.faults import FaultKill
from adre_ray.distributed.train_checkpoint import restore_weights
from adre_ray.distributed.train_report import (
    Worker,
    epoch_metrics,
    quiet_ray_train_reports,
    report_epoch,
    say,
)
from adre_ray.precision import autocast_dtype, resolve_precision
from adre_ray.tracking import DISABLED

TRAIN_CONFIG_KEY = "train_config"
MLFLOW_RUN_ID_KEY = "mlflow_run_id"
TRACKING_URI_KEY = "tracking_uri"
RESUME_FROM_KEY = "resume_from"
LOADER_KEY = "loader"
"""Loop-config key: the resolved training input, ``ray_data`` or ``torch`` (``build_trainer`` sets it)."""
IMPORT_PATHS_KEY = "import_paths"
"""Loop-config key: the driver's working directory, put on each worker's ``sys.path`` for ``model_fn``."""
RESERVED_KEYS = (TRAIN_CONFIG_KEY, MLFLOW_RUN_ID_KEY, TRACKING_URI_KEY, RESUME_FROM_KEY, LOADER_KEY,
                 IMPORT_PATHS_KEY)


def config_from_loop_config(config: Mapping[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` in ``config["train_config"]`` with every other non-reserved key applied as a
    dotted override (so Ray Tune can search ``{"loss.lam": tune.grid_search([...])}``)."""
    if TRAIN_CONFIG_KEY not in config:
        raise ValueError(f"config keys={sorted(config)}: missing {TRAIN_CONFIG_KEY!r}")
    cfg = TrainConfig.from_dict(config[TRAIN_CONFIG_KEY])
    overrides = {key: value for key, value in config.items() if key not in RESERVED_KEYS}
    return cfg.replace(**overrides) if overrides else cfg


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train ``TrainConfig`` ``config["train_config"]`` on this Ray Train worker (see the module docstring).

    Reports once per epoch, from every rank: ``epoch`` (0-based), ``l_per``, ``l_adre``, ``loss``,
    ``train_acc_noise`` (means over all workers' images), ``test_acc_noise`` / ``test_acc_clean`` (the
    test subset, split over the workers, counts summed), ``epoch_time_s``, ``images_per_s`` (training
    images per second of one worker, mean over workers), ``images_per_s_total`` (summed), ``lr``,
    ``epsilon``. Rank 0 attaches the checkpoint and logs the same metrics to MLflow run
    ``config["mlflow_run_id"]`` (if any) at step ``epoch``.
    """
    from adre_ray.training import evaluate_under_noise, loss_from_config, train_one_epoch
    from adre_ray.training.certified_validation import run_validation
    from adre_ray.training.seeds import rng_seed, seed_everything

    cfg = config_from_loop_config(config)
    worker, amp_dtype = start_worker(cfg)
    data = worker_data(cfg, worker, loader=config.get(LOADER_KEY))
    training = build_training(cfg, worker, data.steps_per_epoch, resume_from=config.get(RESUME_FROM_KEY),
                              import_paths=config.get(IMPORT_PATHS_KEY, []))
    loss_fn = loss_from_config(cfg.loss)  # any registered loss, through its one interface
    fault = FaultKill.from_env()  # the one test hook: None unless a fault-tolerance test asked for a crash
    run = cfg.run
    for epoch in range(training.start_epoch, cfg.schedule.epochs):
        seed_everything(run.seed, epoch, worker.rank)
        batches = data.train_batches(epoch)
        if fault is not None:
            batches = fault.wrap(batches, epoch=epoch, rank=worker.rank)
        train_stats = train_one_epoch(training.ddp_model, batches, loss_fn, training.optimizer,
                                      training.scheduler, device=worker.device, epoch=epoch,
                                      amp_dtype=amp_dtype, max_batches=run.train_max_batches,
                                      progress=run.progress and worker.rank == 0,
                                      channels_last=run.channels_last)
        broadcast_buffers(training.model, worker)  # every rank evaluates exactly the model rank 0 saves
        test_stats = evaluate_under_noise(training.eval_model, data.test_loader, cfg.loss.sigma,
                                          device=worker.device, amp_dtype=amp_dtype,
                                          max_batches=run.eval_max_batches,
                                          seed=rng_seed(run.seed, epoch, worker.rank, stream=1),
                                          channels_last=run.channels_last, fixed_shape=run.compile)
        metrics = epoch_metrics(epoch, train_stats, test_stats, worker)
        if cfg.validation.enabled and epoch == cfg.schedule.epochs - 1:  # approx certified accuracy
            metrics.update(run_validation(training.eval_model, cfg.validation, cfg.data, cfg.loss.sigma,
                                          rank=worker.rank, world_size=worker.world_size, amp_dtype=amp_dtype,
                                          channels_last=run.channels_last))
        report_epoch(metrics, training, cfg, worker, mlflow_run_id=str(config.get(MLFLOW_RUN_ID_KEY) or ""),
                     tracking_uri=str(config.get(TRACKING_URI_KEY) or DISABLED))


def start_worker(cfg: TrainConfig) -> tuple[Worker, Any]:
    """This worker's rank, world size and device, its numerics (threads, cuDNN, precision: the autocast
    dtype or None) and identical initial-weight seeds on every rank."""
    import ray.train
    import ray.train.torch
    import torch

    from adre_ray.device import require_cuda, set_numerics
    from adre_ray.training.seeds import seed_everything

    if not cfg.run.verbose:
        quiet_ray_train_reports()
    context = ray.train.get_context()
    worker = Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    if cfg.scaling.use_gpu:  # never train on the CPU when GPUs were asked for
        require_cuda("adre-ray train")
    set_numerics(worker.device, deterministic=cfg.run.deterministic)  # cuDNN autotuning on GPU (fixed shapes)
    if worker.device.type != "cuda":
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    seed_everything(cfg.run.seed, -1, 0)  # identical initial weights on every rank
    return worker, autocast_dtype(resolve_precision(cfg.run.precision_setting, worker.device))


@dataclass
class WorkerData:
    """This worker's input: ``train_batches(epoch)`` (its shard, reshuffled per epoch), how many batches
    an epoch has, and its strided shard of the test set."""

    train_batches: Callable[[int], Any]
    steps_per_epoch: int
    test_loader: Any


def worker_data(cfg: TrainConfig, worker: Worker, *, loader: str | None) -> WorkerData:
    """Ray Data shards (``loader="ray_data"``, ``adre_ray.distributed.ingest``) or a ``DistributedSampler``
    over the local dataset; evaluation reads the strided test shard ``rank::world_size``."""
    from torch.utils.data import DataLoader, Subset

    from adre_ray.data import build_dataset

    data = cfg.data
    loader_kwargs: dict[str, Any] = dict(num_workers=data.loader_workers,
                                         pin_memory=worker.device.type == "cuda",
                                         persistent_workers=data.loader_workers > 0)
    test_loader: Any = None
    if loader == "ray_data":  # batches streamed by Ray Data
        from adre_ray.distributed.ingest import worker_loaders

        train_batches, steps, test_loader = worker_loaders(cfg, rank=worker.rank,
                                                           world_size=worker.world_size, device=worker.device)
        if not storage.is_remote(data.data_dir):  # a local test split: the torch loader's seeded subset
            test_set = build_dataset(data.dataset, data.data_dir, "test", source=data.source, augment=False,
                                     subset=data.test_subset, subset_seed=data.subset_seed)
    else:
        train_batches, steps, test_set = _sampled_loaders(cfg, worker, loader_kwargs)
    if test_loader is None:
        shard = Subset(test_set, range(worker.rank, len(test_set), worker.world_size))  # type: ignore[arg-type]
        test_loader = DataLoader(shard, batch_size=cfg.per_worker_batch_size, shuffle=False, **loader_kwargs)
    if cfg.run.train_max_batches is not None:
        steps = min(steps, cfg.run.train_max_batches)
    return WorkerData(train_batches, steps, test_loader)


def _sampled_loaders(cfg: TrainConfig, worker: Worker, loader_kwargs: dict[str, Any]
                     ) -> tuple[Callable[[int], Any], int, Any]:
    """The torch path: (``epoch -> DataLoader`` over this worker's ``DistributedSampler`` shard, batches
    per epoch, the test dataset). The first worker of each node downloads alone."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from adre_ray.data import build_dataset

    data, batch = cfg.data, cfg.per_worker_batch_size
    first_on_node = ray.train.get_context().get_local_rank() == 0
    download_barrier = data.download and worker.world_size > 1
    if download_barrier and not first_on_node:
        torch.distributed.barrier()
    train_set = build_dataset(data.dataset, data.data_dir, "train", source=data.source, augment=data.augment,
                              subset=data.train_subset, subset_seed=data.subset_seed, download=data.download)
    test_set = build_dataset(data.dataset, data.data_dir, "test", source=data.source, augment=False,
                             subset=data.test_subset, subset_seed=data.subset_seed, download=data.download)
    if download_barrier and first_on_node:
        torch.distributed.barrier()
    sampler = DistributedSampler(train_set, num_replicas=worker.world_size, rank=worker.rank, shuffle=True,
                                 seed=cfg.run.seed, drop_last=False)
    if len(sampler) < batch:
        raise ValueError(f"batch_size={cfg.batch_size}: each of {worker.world_size} workers gets "
                         f"{len(sampler)} training images, fewer than its batch of {batch}")
    train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True, **loader_kwargs)
    train_loader = ray.train.torch.prepare_data_loader(train_loader)  # keeps our sampler, moves to device

    def train_batches(epoch: int) -> Any:
        sampler.set_epoch(epoch)
        return train_loader

    return train_batches, len(sampler) // batch, test_set


@dataclass
class Training:
    """The state an epoch updates: the model (``ddp_model`` trains it, ``eval_model`` evaluates it without
    DDP collectives), the optimizer and schedule, and the first epoch still to run."""

    model: Any
    ddp_model: Any
    eval_model: Any
    optimizer: Any
    scheduler: Any
    start_epoch: int


def build_training(cfg: TrainConfig, worker: Worker, steps_per_epoch: int, *, resume_from: str | None,
                   import_paths: list[str]) -> Training:
    """Model, optimizer and schedule, restored from the run's checkpoint when there is one (weights before
    DDP wraps the model; DDP broadcasts rank 0's anyway). DDP first, compile after, so the gradient
    all-reduce overlaps the backward."""
    import ray.train.torch
    import torch

    from adre_ray.data import dataset_info
    from adre_ray.models import build_model
    from adre_ray.models.model_fn import add_import_paths, build_model_fn
    from adre_ray.training import build_optimizer, build_scheduler
    from adre_ray.training.compiled import training_modules

    add_import_paths([*import_paths, os.getcwd()])
    model = (build_model_fn(cfg.model_fn).train() if cfg.model_fn is not None
             else build_model(cfg.model, dataset_info(cfg.data.dataset).num_classes, cfg.data.dataset))
    train_state, restored_from = restore_weights(model, cfg, resume_from)
    if cfg.run.channels_last:  # on CPU too (oneDNN's NHWC kernels)
        model = model.to(memory_format=torch.channels_last)
    if cfg.scaling.sync_batchnorm and worker.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    ddp_model, eval_model = training_modules(model, ray.train.torch.prepare_model, compile=cfg.run.compile)
    o, s = cfg.optim, cfg.schedule
    optimizer = build_optimizer(model, o.lr, o.momentum, o.weight_decay, o.nesterov,
                                decay_norm_and_bias=o.decay_norm_and_bias)
    scheduler = build_scheduler(optimizer, s.name, epochs=s.epochs, steps_per_epoch=steps_per_epoch,
                                warmup_epochs=s.warmup_epochs, step_size=s.step_size, gamma=s.gamma)
    start_epoch = 0
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        start_epoch = int(train_state["epoch"]) + 1
        if worker.rank == 0:
            say(f"[adre-ray train] resuming after epoch {start_epoch - 1} ({restored_from})")
    return Training(model, ddp_model, eval_model, optimizer, scheduler, start_epoch)


def broadcast_buffers(model: Any, worker: Worker) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank; weights already agree (DDP)."""
    if worker.world_size == 1:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


__all__ = ["IMPORT_PATHS_KEY", "LOADER_KEY", "MLFLOW_RUN_ID_KEY", "RESERVED_KEYS", "RESUME_FROM_KEY",
           "TRACKING_URI_KEY", "TRAIN_CONFIG_KEY", "Training", "WorkerData", "build_training",
           "config_from_loop_config", "start_worker", "train_loop_per_worker", "worker_data"]
