"""MLflow tracking for every job: one embedded store (no server), runs named by the job.

The tracking URI is resolved once on the driver (explicit > ``MLFLOW_TRACKING_URI`` > a SQLite file in
the working directory) and made absolute, so Ray workers started in other folders write to the same
store. ``"none"`` disables tracking: every function here then does nothing.

MLflow is imported lazily so importing this module (on every Ray worker) stays cheap.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DISABLED = "none"
DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"

# MLflow's server-side limits (mlflow.utils.validation); kept here so no import is needed to use them.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_NAMED_URIS = ("databricks", "databricks-uc", "uc")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI to use: ``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``.

    Relative SQLite paths and plain local folders are made absolute (against the current directory),
    so the driver and every Ray worker agree. ``"none"`` (any case; also ``off``/``disabled``) returns
    ``"none"``, which turns tracking off.
    """
    chosen = uri if uri not in (None, "") else os.environ.get("MLFLOW_TRACKING_URI", "")
    chosen = (chosen or f"sqlite:///{Path.cwd().resolve() / DB_FILENAME}").strip()
    if chosen.lower() in (DISABLED, "off", "disabled"):
        return DISABLED
    if chosen.startswith("sqlite:///"):
        path = chosen[len("sqlite:///"):]
        if not path.startswith("/"):
            path = str(Path.cwd().resolve() / path)
        return f"sqlite:///{path}"
    if chosen.startswith("file://"):
        return chosen
    if "://" not in chosen and chosen not in _NAMED_URIS:
        return Path(chosen).expanduser().resolve().as_uri()  # a local folder: MLflow's file store
    return chosen


def tracking_enabled(uri: str | None = None) -> bool:
    """False when the resolved URI is ``"none"``."""
    return resolve_tracking_uri(uri) != DISABLED


@dataclass(frozen=True)
class _DisabledRunInfo:
    run_id: str = ""
    experiment_id: str = ""
    run_name: str = ""


@dataclass(frozen=True)
class DisabledRun:
    """Stand-in for ``mlflow.ActiveRun`` when tracking is off (``run.info.run_id == ""``)."""

    info: _DisabledRunInfo = field(default_factory=_DisabledRunInfo)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (not in the current directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "default"
    return (db_path.parent / ARTIFACTS_DIRNAME / safe).as_uri()


def get_or_create_experiment(experiment: str, *, tracking_uri: str | None = None) -> str:
    """The id of experiment ``experiment``, created if missing (safe when processes race to create it)."""
    if not experiment:
        raise ValueError(f"experiment={experiment!r}: must be a non-empty name")
    uri = resolve_tracking_uri(tracking_uri)
    if uri == DISABLED:
        return ""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    for _attempt in range(5):
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(experiment,
                                                artifact_location=_artifact_location(uri, experiment)))
        except MlflowException:  # created concurrently by another process: look it up again
            time.sleep(0.2)
    raise RuntimeError(f"experiment={experiment!r}: could not be created in {uri}")


@contextmanager
def mlflow_run(
    experiment: str,
    run_name: str | None = None,
    *,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """Open an MLflow run and yield the active ``mlflow.ActiveRun``; it ends FINISHED, or FAILED on error.

    ``run_id`` resumes an existing run; ``parent_run_id`` makes a nested child of that run (it need not
    be active in this process). With tracking off, yields a ``DisabledRun`` whose ``info.run_id`` is "".
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri == DISABLED:
        yield DisabledRun()
        return
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = None if run_id else get_or_create_experiment(experiment, tracking_uri=uri)
    active = mlflow.active_run()
    nested = parent_run_id is not None or active is not None
    other_parent = None
    if parent_run_id is not None and active is not None and active.info.run_id != parent_run_id:
        # MLflow nests under the active run only; the parent tag is then set to the requested run.
        other_parent, parent_run_id = parent_run_id, None
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name, nested=nested,
                          parent_run_id=parent_run_id,
                          tags={k: str(v) for k, v in (tags or {}).items()} or None) as run:
        if other_parent is not None:
            mlflow.set_tag("mlflow.parentRunId", other_parent)
        yield run


def _param_value(value: Any) -> str:
    text = str(list(value)) if isinstance(value, tuple) else str(value)
    return text if len(text) <= MAX_PARAM_VALUE_LENGTH else text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."


def _active_run_id(run_id: str | None) -> str:
    if run_id:
        return run_id
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise ValueError("run_id=None: no active MLflow run (open one with mlflow_run or pass run_id)")
    return str(active.info.run_id)


def log_config(cfg: Any, *, run_id: str | None = None, tracking_uri: str | None = None) -> dict[str, str]:
    """Log a job config as flat MLflow params (``"loss.lam": "0.2"``), batched, values cut to MLflow limits.

    ``cfg`` is a ``JobConfig`` (its ``flat_dict()``) or a flat mapping. Params already on the run (a
    resumed run) are kept, as MLflow params are immutable; a changed value is recorded as tag
    ``changed_param.<key>`` instead. Returns the params that were logged.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri == DISABLED:
        return {}
    from mlflow.entities import Param, RunTag

    flat = cfg.flat_dict() if hasattr(cfg, "flat_dict") else dict(cfg)
    client = _client(uri)
    rid = _active_run_id(run_id)
    existing = client.get_run(rid).data.params
    params = {str(k)[:250]: _param_value(v) for k, v in flat.items()}
    new = {k: v for k, v in params.items() if k not in existing}
    changed = {f"changed_param.{k}"[:250]: v for k, v in params.items() if k in existing and existing[k] != v}
    items = sorted(new.items())
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        batch = [Param(k, v) for k, v in items[start:start + MAX_PARAMS_PER_BATCH]]
        client.log_batch(rid, params=batch, synchronous=True)
    tags = sorted(changed.items())
    for start in range(0, len(tags), MAX_PARAMS_PER_BATCH):
        client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags[start:start + MAX_PARAMS_PER_BATCH]],
                         synchronous=True)
    return new


def _finite_number(value: Any) -> float | None:
    """``float(value)`` for a finite real number (Python, NumPy or 0-d tensor), else None (bools too)."""
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        value = value.item()  # 0-d numpy array / torch tensor
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, *, run_id: str | None = None,
                tracking_uri: str | None = None) -> dict[str, float]:
    """Log the finite numeric entries of ``metrics`` at ``step`` (others skipped); returns what was logged.

    Without ``run_id`` the active run is used. With ``run_id`` the run's status is left alone, so a Ray
    worker can log live into a run the driver owns.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri == DISABLED:
        return {}
    from mlflow.entities import Metric

    values = {str(k)[:250]: v for k, v in ((k, _finite_number(v)) for k, v in metrics.items())
              if v is not None}
    if not values:
        return {}
    rid = _active_run_id(run_id)
    timestamp = int(time.time() * 1000)
    items = sorted(values.items())
    client = _client(uri)
    for start in range(0, len(items), MAX_METRICS_PER_BATCH):
        batch = [Metric(k, v, timestamp, step or 0) for k, v in items[start:start + MAX_METRICS_PER_BATCH]]
        client.log_batch(rid, metrics=batch, synchronous=True)
    return values


def set_tags(tags: Mapping[str, Any], *, run_id: str | None = None, tracking_uri: str | None = None) -> None:
    """Set string tags on a run (the active one without ``run_id``)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri == DISABLED or not tags:
        return
    from mlflow.entities import RunTag

    rid = _active_run_id(run_id)
    _client(uri).log_batch(rid, tags=[RunTag(str(k), str(v)[:8000]) for k, v in tags.items()],
                           synchronous=True)


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None, *, run_id: str | None = None,
                 tracking_uri: str | None = None) -> None:
    """Copy a local file or folder into the run's artifacts (under ``artifact_path``)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri == DISABLED:
        return
    path = Path(path)
    if not path.exists():
        raise ValueError(f"path={str(path)!r}: no such file or folder to log as an artifact")
    client = _client(uri)
    rid = _active_run_id(run_id)
    if path.is_dir():
        client.log_artifacts(rid, str(path), artifact_path)
    else:
        client.log_artifact(rid, str(path), artifact_path)
