"""A finished search's outputs: one row per trial, the best trial, ``trials.csv``, ``best_config.yaml``,
and each trial's MLflow child run closed with the status of its Tune outcome."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adre_ray.config.train import TrainConfig
from adre_ray.config.tune import TuneSpace
from adre_ray.distributed.train_report import EPOCH_METRICS
from adre_ray.distributed.tune_space import plain, trial_overrides
from adre_ray.tracking import DISABLED, log_artifact, log_metrics, set_tags
from adre_ray.training.certified_validation import metric_names

TRIAL_ID_TAG = "adre_ray.trial_id"
BEST_CONFIG_FILENAME = "best_config.yaml"
TRIALS_FILENAME = "trials.csv"


@dataclass(frozen=True)
class SearchOutcome:
    """What a search produced: the output folder, the trials' table, the best trial (None if no trial
    finished with the objective) and the MLflow parent run id ("" with tracking off)."""

    output_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: TrainConfig | None
    parent_run_id: str


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_rows(results: Any, space: TuneSpace, base: TrainConfig) -> list[dict[str, Any]]:
    """One row per trial: id, status, epochs run, searched values (effective), metrics of its last report."""
    dists = space.distributions()
    approx = metric_names(space.validation.radius)
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name
        overrides = trial_overrides(result.config, dists, base)
        epochs_total = int(overrides.get("schedule.epochs", base.schedule.epochs))
        done = int(metrics.get("training_iteration", 0) or 0)
        if result.error is not None:
            status = "ERROR"
        elif done >= epochs_total:
            status = "COMPLETED"
        else:
            status = "STOPPED"  # ASHA stopped it at a rung
        row: dict[str, Any] = {"trial_id": trial_id, "status": status, "epochs": done}
        row.update(overrides)
        row[space.metric] = metrics.get(space.metric, math.nan)
        for key in (*EPOCH_METRICS, *approx):
            if key not in row and key != "epoch":
                row[key] = metrics.get(key, math.nan)
        row["time_total_s"] = metrics.get("time_total_s", math.nan)  # trial function start -> last report
        row["finished_at"] = metrics.get("timestamp", math.nan)  # unix time of the last report
        row["error"] = "" if result.error is None else f"{type(result.error).__name__}: {result.error}"[:500]
        rows.append(row)
    return rows


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The COMPLETED trial with the best finite ``metric`` (ties: the first trial)."""
    candidates = [r for r in rows if r["status"] == "COMPLETED" and _finite(r.get(metric))]
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda r: sign * float(r[metric]))


def _yamlplain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _yamlplain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yamlplain(v) for v in value]
    return plain(value)


def write_best_config(path: Path, cfg: TrainConfig, best: Mapping[str, Any], metric: str) -> None:
    """The best trial's TrainConfig as YAML (``adre-ray train --config`` reads it), with a header."""
    header = (f"# Best trial {best['trial_id']} of an adre-ray tune search: {metric} = {best[metric]!r}\n"
              f"# (approx_* = certified-validation ESTIMATE with small n; certify the final model for real\n"
              f"# figures). Retrain with: adre-ray train --config {path.name}\n")
    path.write_text(header + yaml.safe_dump(_yamlplain(cfg.to_dict()), sort_keys=False))


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def close_child_runs(rows: list[dict[str, Any]], parent_run_id: str, experiment: str, tracking_uri: str
                      ) -> dict[str, str]:
    """Set each trial's MLflow run status from its Tune outcome (FINISHED, KILLED when stopped by ASHA,
    FAILED on error): Tune stops a trial right after its last report, before it can end its run itself.
    Returns {trial_id: run_id}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)
    by_trial = {run.data.tags.get(TRIAL_ID_TAG, ""): run  # the newest run of a trial wins
                for run in sorted(runs, key=lambda r: r.info.start_time or 0)}
    final_status = {"COMPLETED": "FINISHED", "STOPPED": "KILLED", "ERROR": "FAILED"}
    for row in rows:
        run = by_trial.get(str(row["trial_id"]))
        if run is None:
            continue
        row["mlflow_run_id"] = run.info.run_id
        set_tags({"adre_ray.trial_status": row["status"]}, run_id=run.info.run_id, tracking_uri=tracking_uri)
        # the trial process may have been stopped mid-way (ASHA, or the end of its last epoch): RUNNING, or
        # FAILED from the stop signal; the trial's outcome in Tune decides
        if run.info.status != final_status[row["status"]]:
            client.set_terminated(run.info.run_id, status=final_status[row["status"]])
    return {str(t): r.info.run_id for t, r in by_trial.items()}


def record_search(results: Any, space: TuneSpace, base: TrainConfig, out_dir: Path, *, parent_id: str,
                  tracking_uri: str) -> SearchOutcome:
    """A finished search's outcome: ``trials.csv`` and ``best_config.yaml`` in ``out_dir``, each trial's
    MLflow run closed with its Tune status, and the parent run's summary metrics, best-trial tags and the
    two files as artifacts."""
    dists = space.distributions()
    rows = trial_rows(results, space, base)
    if tracking_uri != DISABLED and parent_id:
        close_child_runs(rows, parent_id, space.experiment, tracking_uri)
    best = best_row(rows, space.metric, space.mode)
    best_cfg = None
    table = out_dir / TRIALS_FILENAME
    write_table(table, rows)
    summary = {"trials": len(rows), "trials_completed": sum(r["status"] == "COMPLETED" for r in rows),
               "trials_stopped": sum(r["status"] == "STOPPED" for r in rows),
               "trials_failed": sum(r["status"] == "ERROR" for r in rows)}
    if best is not None:
        overrides = {d.key: best[d.key] for d in dists}
        best_cfg = base.replace(**overrides,
                                **{"run.name": None, "run.storage_path": base.run.storage_path})
        write_best_config(out_dir / BEST_CONFIG_FILENAME, best_cfg, best, space.metric)
        summary.update({f"best_{k}": v for k, v in best.items()
                        if k.startswith("approx_") or k in EPOCH_METRICS})
        summary[f"best_{space.metric}"] = best[space.metric]
        set_tags({"best_trial_id": best["trial_id"], **{f"best.{k}": v for k, v in overrides.items()}},
                 run_id=parent_id or None, tracking_uri=tracking_uri)
    log_metrics(summary, run_id=parent_id or None, tracking_uri=tracking_uri)
    log_artifact(table, run_id=parent_id or None, tracking_uri=tracking_uri)
    if best_cfg is not None:
        log_artifact(out_dir / BEST_CONFIG_FILENAME, run_id=parent_id or None, tracking_uri=tracking_uri)
    return SearchOutcome(output_dir=out_dir, rows=rows, best=best, best_config=best_cfg,
                         parent_run_id=parent_id)


__all__ = ["BEST_CONFIG_FILENAME", "TRIALS_FILENAME", "TRIAL_ID_TAG", "SearchOutcome", "best_row",
           "close_child_runs", "record_search", "trial_rows", "write_best_config", "write_table"]
