"""A training run's checkpoints: their format, finding the newest, restoring one, and what a resume may
change.

A checkpoint folder ``checkpoint_epoch_NNNNNN`` holds ``model.pt`` (adre_ray.models format, with the
config, the MLflow run id, the epoch and the resolved precision in ``extra``) and ``train_state.pt``
(optimizer, scheduler, epoch; tensors and primitives only, loaded with ``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adre_ray import storage
from adre_ray.config import flatten
from adre_ray.config.base import effective_precision
from adre_ray.config.train import TrainConfig
from adre_ray.precision import refuse_mixed_precision, resolve_precision

TRAIN_STATE_FILENAME = "train_state.pt"
CHECKPOINT_PREFIX = "checkpoint_epoch_"


def load_train_checkpoint(directory: Path, model: Any, cfg: TrainConfig) -> dict[str, Any]:
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


def save_train_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any, *, cfg: TrainConfig,
                          epoch: int, metrics: Mapping[str, Any], mlflow_run_id: str) -> None:
    """Write ``model.pt`` and ``train_state.pt`` of the state after ``epoch`` into ``directory``."""
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


def restore_weights(model: Any, cfg: TrainConfig, resume_from: str | None
                    ) -> tuple[dict[str, Any] | None, str]:
    """On a worker: load the checkpoint to continue from into ``model`` and return its train state and a
    description of where it came from; ``(None, "")`` for a fresh run.

    Ray Train's own checkpoint of this run comes first (after a failure or for a restored run), else
    ``resume_from`` (the driver's newest ``checkpoint_epoch_*`` of a run of the same name)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    source = "Ray Train run state"
    if checkpoint is None and resume_from:
        checkpoint, source = ray.train.Checkpoint(str(resume_from)), "resume_from"
    if checkpoint is None:
        return None, ""
    with checkpoint.as_directory() as directory:
        return load_train_checkpoint(Path(directory), model, cfg), f"{source}: {checkpoint.path}"


def latest_checkpoint(run_path: str) -> Any | None:
    """The most recently written complete checkpoint folder (``checkpoint_*`` holding ``train_state.pt``)
    under ``run_path``, at any depth, on local or cloud storage, as a ``ray.train.Checkpoint``; or None.

    Ordered by the write time of ``train_state.pt``: V2 names folders ``checkpoint_epoch_NNNNNN``, V1
    numbers them per attempt (``<trial>/checkpoint_NNNNNN``), so names alone do not order them.
    """
    from ray.train import Checkpoint

    try:
        fs, _ = storage.resolve(run_path)
        _, files = storage.walk_files(run_path)
    except (OSError, ValueError):
        return None
    states = [info for info in files if info.base_name == TRAIN_STATE_FILENAME
              and info.path.rsplit("/", 2)[-2].startswith("checkpoint_")]
    if not states:
        return None
    newest = max(states, key=lambda info: (info.mtime_ns or 0, info.path))
    return Checkpoint(path=newest.path.rsplit("/", 1)[0], filesystem=fs)


RESUME_MAY_CHANGE: tuple[str, ...] = (
    "schedule.epochs", "scaling.", "data.data_dir", "data.source", "data.download", "data.loader_workers",
    "data.test_subset", "validation.", "run.name", "run.experiment", "run.storage_path", "run.tracking_uri",
    "run.max_failures", "run.checkpoints_to_keep", "run.channels_last", "run.compile",
    "run.eval_max_batches", "run.progress", "run.verbose", "run.deterministic", "run.amp", "run.precision",
    "run.shared_filesystem", "run.resource_wait_s", "run.autoscale_wait_s",
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


__all__ = ["CHECKPOINT_PREFIX", "RESUME_MAY_CHANGE", "TRAIN_STATE_FILENAME", "check_resume_settings",
           "latest_checkpoint", "load_train_checkpoint", "restore_weights", "save_train_checkpoint",
           "stored_train_precision", "train_precision"]
