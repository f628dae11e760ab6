"""Experiment tracking in MLflow (embedded store, no server): runs, flat config params, live metrics."""

from adre_ray.tracking.runs import (
    DISABLED,
    DisabledRun,
    get_or_create_experiment,
    log_artifact,
    log_config,
    log_metrics,
    mlflow_run,
    resolve_tracking_uri,
    set_tags,
    tracking_enabled,
)

__all__ = [
    "DISABLED", "DisabledRun", "get_or_create_experiment", "log_artifact", "log_config", "log_metrics",
    "mlflow_run", "resolve_tracking_uri", "set_tags", "tracking_enabled",
]
