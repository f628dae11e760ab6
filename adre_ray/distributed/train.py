"""Training as DDP under Ray Train: ``adre-ray train --config FILE --set loss.lam=0.2``.

This module is the driver: it resolves the run (name, storage, MLflow run, the checkpoint to resume),
declares scaling, storage and failure handling in ``ScalingConfig`` / ``RunConfig`` / ``FailureConfig``
(:func:`build_trainer`) and fits the trainer. Every Ray Train worker runs ``train_loop_per_worker``
(``train_worker.py``: Algorithm 1 per epoch), with the checkpoint format and resume rules in
``train_checkpoint.py`` and the epoch's reduction, checkpoint and MLflow logging in ``train_report.py``.

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
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adre_ray import storage
from adre_ray.analysis.output_folder import check_output_dir
from adre_ray.config import load_config
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
from adre_ray.distributed.train_checkpoint import (
    CHECKPOINT_PREFIX,
    RESUME_MAY_CHANGE,
    TRAIN_STATE_FILENAME,
    check_resume_settings,
    latest_checkpoint,
    stored_train_precision,
    train_precision,
)
from adre_ray.distributed.train_checkpoint import load_train_checkpoint as _load_train_checkpoint
from adre_ray.distributed.train_report import EPOCH_METRICS
from adre_ray.distributed.train_report import log_epoch as _log_epoch
from adre_ray.distributed.train_worker import (
    IMPORT_PATHS_KEY,
    LOADER_KEY,
    MLFLOW_RUN_ID_KEY,
    RESUME_FROM_KEY,
    TRACKING_URI_KEY,
    TRAIN_CONFIG_KEY,
    config_from_loop_config,
    train_loop_per_worker,
)
from adre_ray.precision import precision_params, warn_if_emulated
from adre_ray.tracking import (
    DISABLED,
    log_artifact,
    log_config,
    log_metrics,
    mlflow_run,
    resolve_tracking_uri,
)

RUN_PATH_TAG = "adre_ray.train_path"


@dataclass(frozen=True)
class TrainResult:
    """Where the trained model is: the final checkpoint folder (holding model.pt), its MLflow run, and the
    last epoch's metrics (empty when there was nothing left to train)."""

    checkpoint_path: str
    mlflow_run_id: str
    metrics: dict[str, Any]


# -- the driver ---------------------------------------------------------------------------------------


def default_run_name(cfg: TrainConfig) -> str:
    """``<model>_<loss>_<YYYYmmdd-HHMMSS>`` (a fresh run each time)."""
    model = cfg.model_fn.rsplit(":", 1)[-1] if cfg.model_fn is not None else cfg.model
    return f"{model}_{cfg.loss.name}_{time.strftime('%Y%m%d-%H%M%S')}"


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
    """V2: worker-group start attempts bounded by ``run.resource_wait_s``, or ``run.autoscale_wait_s`` when
    the connected cluster's autoscaler can add nodes (Ray retries them forever by default, so a run whose
    node died and was not replaced would wait without end)."""
    import dataclasses

    import ray
    from ray.train import FailureConfig

    if not train_v2_enabled() or "controller_failure_limit" not in {f.name for f in
                                                                     dataclasses.fields(FailureConfig)}:
        return {}
    wait_s = cfg.run.resource_wait_s
    if ray.is_initialized() and cluster_facts().autoscaling:
        wait_s = max(wait_s, cfg.run.autoscale_wait_s)
    return {"controller_failure_limit": controller_failure_limit(wait_s)}


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


def __getattr__(name: str) -> Any:
    """``rng_seed`` (``adre_ray.training.seeds``), re-exported lazily: the training package imports torch,
    and ``adre-ray train --help`` must not."""
    if name == "rng_seed":
        from adre_ray.training.seeds import rng_seed

        return rng_seed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # the driver, and the names users and tests import from here (defined in the modules above)
    "CHECKPOINT_PREFIX", "EPOCH_METRICS", "MLFLOW_RUN_ID_KEY", "RESUME_MAY_CHANGE", "TRACKING_URI_KEY",
    "TRAIN_STATE_FILENAME", "FaultKill", "TrainResult", "_load_train_checkpoint", "_log_epoch",
    "build_parser", "build_trainer", "check_resume_settings", "check_train_paths", "config_from_loop_config",
    "default_run_name", "fault_worker_env", "latest_checkpoint", "localize_paths", "main",
    "run_training", "stored_train_precision", "train_loop_per_worker", "train_precision",
    "worker_group_needs",
]


if __name__ == "__main__":
    sys.exit(main())
