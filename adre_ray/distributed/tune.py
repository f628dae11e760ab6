"""Hyper-parameter search with Ray Tune: ``adre-ray tune --space FILE --config FILE [--set k=v]``.

Each Tune trial is one Ray Train run (Ray Train V2, the default in Ray 2.60, no longer accepts a Trainer
inside a Tuner): the trial function builds the trial's ``TrainConfig`` (train config + the space's
overrides + the sampled values), opens an MLflow child run of the search's parent run, and fits the same
``TorchTrainer`` as ``adre-ray train`` (``build_trainer``). A ``TuneReportCallback`` forwards every
epoch's metrics from the Train workers to Tune, so the ASHA scheduler compares trials on a per-epoch
metric (``test_acc_noise``) and stops the worse ones at its rungs. The final epoch of a trial also runs
the certified validation (``adre_ray.training.certified_validation``, section ``validation``) and
reports ``approx_*`` metrics with it; finished trials are ranked by the space's ``metric``.

The trial function itself only waits on its Train run, so it reserves no CPU (Tune needs a non-empty
request: 1 byte of memory); the Train workers reserve ``resources`` per trial, and up to
``max_concurrent`` trials (default: as many as the cluster's CPUs / GPUs hold) run at once.

Outputs in ``<output_dir>/<name>/``: ``best_config.yaml`` (the best trial's full TrainConfig, usable as
``adre-ray train --config``), ``trials.csv`` (one row per trial), ``tune/`` (Tune's experiment state),
``train/`` (each trial's Ray Train checkpoints; these two under ``<run.storage_path>/<name>/`` when the
train config stores to a cloud URI). MLflow: one parent run (the space as params, best
metrics, both files as artifacts) and one child run per trial (its params, per-epoch and approx_*
metrics; status FINISHED, KILLED when ASHA stopped it, FAILED on error).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adre_ray.config import load_config, parse_overrides
from adre_ray.config.train import TrainConfig
from adre_ray.config.tune import Distribution, TuneSpace, load_space
from adre_ray.distributed._common import (
    connect_ray,
    interrupted,
    is_local_storage,
    ray_storage,
)
from adre_ray.distributed.cluster import cluster_facts
from adre_ray.distributed.train import (
    EPOCH_METRICS,
    MLFLOW_RUN_ID_KEY,
    TRACKING_URI_KEY,
    build_trainer,
    check_train_paths,
)
from adre_ray.parsers import tune_parser
from adre_ray.storage import CREDENTIAL_ENV_VARS, storage_env
from adre_ray.tracking import (
    DISABLED,
    log_artifact,
    log_config,
    log_metrics,
    mlflow_run,
    resolve_tracking_uri,
    set_tags,
)
from adre_ray.training.certified_validation import metric_names

TRIAL_ID_TAG = "adre_ray.trial_id"
SEARCH_TAG = "adre_ray.search"
BEST_CONFIG_FILENAME = "best_config.yaml"
TRIALS_FILENAME = "trials.csv"
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
TUNE_DIRNAME = "tune"
"""Tune's experiment folder under the search's storage; ``Tuner.restore`` resumes from it."""
"""The trial function only waits on its Ray Train run: no CPU (Tune rejects an empty request)."""


# -- search space -> Tune ------------------------------------------------------------------------------


def tune_domain(dist: Distribution) -> Any:
    """The Ray Tune object of one distribution (grid_search, choice, uniform, loguniform, randint)."""
    from ray import tune

    if dist.kind == "grid":
        return tune.grid_search(list(dist.values))
    if dist.kind == "choice":
        return tune.choice(list(dist.values))
    lo, hi = dist.bounds
    if dist.kind == "uniform":
        return tune.uniform(float(lo), float(hi))
    if dist.kind == "loguniform":
        return tune.loguniform(float(lo), float(hi))
    return tune.randint(int(lo), int(hi))


def param_space(space: TuneSpace) -> dict[str, Any]:
    """``{dotted key: Tune domain}``: a trial's config holds the drawn value of every searched key."""
    return {dist.key: tune_domain(dist) for dist in space.distributions()}


def _plain(value: Any) -> Any:
    """NumPy scalars (Tune samples them) as Python numbers, so configs validate and YAML stays plain."""
    return value.item() if hasattr(value, "item") and getattr(value, "shape", None) == () else value


def trial_overrides(sampled: Mapping[str, Any], dists: Sequence[Distribution], base: TrainConfig
                    ) -> dict[str, Any]:
    """The dotted overrides of one trial: drawn values, scaled by their ``scale_by`` key's trial value
    (searched, else the base config's)."""
    flat = base.flat_dict()
    values = {d.key: _plain(sampled[d.key]) for d in dists}
    out: dict[str, Any] = {}
    for d in dists:
        value = values[d.key]
        if d.scale_by is not None:
            value = float(value) * float(values.get(d.scale_by, flat[d.scale_by]))
        out[d.key] = value
    return out


def check_space_against(space: TuneSpace, base: TrainConfig) -> None:
    """Validate every grid / choice value and range end of the space on ``base`` (ValueError naming
    ``search.<key>`` and the offending value), and the objective and ASHA settings."""
    dists = space.distributions()
    flat = base.flat_dict()
    for d in dists:
        scales = [1.0]
        if d.scale_by is not None:
            scaler = next((s for s in dists if s.key == d.scale_by), None)
            scales = [float(v) for v in (scaler.endpoints if scaler else (flat[d.scale_by],))]
        for value in d.endpoints:
            for scale in scales:
                effective = value if d.scale_by is None else float(value) * scale
                try:
                    base.replace(**{d.key: effective})
                except ValueError as err:
                    raise ValueError(f"search.{d.key}: value {effective!r} is invalid ({err})") from None
    known = set(EPOCH_METRICS) | set(metric_names(space.validation.radius))
    if space.metric not in known:
        raise ValueError(f"metric={space.metric!r}: not a reported metric (known with validation.radius="
                         f"{list(space.validation.radius)}: {', '.join(sorted(known))})")
    if space.scheduler.name == "asha" and space.scheduler.metric not in EPOCH_METRICS:
        raise ValueError(f"scheduler.metric={space.scheduler.metric!r}: ASHA needs a metric reported every "
                         f"epoch ({', '.join(EPOCH_METRICS)})")
    epochs = max_epochs(space, base)
    if space.scheduler.max_t is not None and space.scheduler.max_t < epochs:
        raise ValueError(f"scheduler.max_t={space.scheduler.max_t}: must be >= schedule.epochs={epochs}, "
                         f"else ASHA stops every trial before its final epoch and none reports "
                         f"{space.metric!r}")


def max_epochs(space: TuneSpace, base: TrainConfig) -> int:
    """The largest ``schedule.epochs`` any trial can have (searched or the base config's)."""
    for d in space.distributions():
        if d.key == "schedule.epochs":
            return int(max(d.endpoints))
    return base.schedule.epochs


def trial_base_config(train: TrainConfig, space: TuneSpace, cli_overrides: Mapping[str, Any] | None = None
                      ) -> TrainConfig:
    """The config every trial starts from: ``train`` + space ``overrides`` + ``resources`` + ``validation``
    (enabled as in the space) + command-line ``--set`` values (last, so they win). Local paths are made
    absolute (trials run in other working directories)."""
    cli = dict(cli_overrides or {})
    searched = [key for key in cli if key in space.search]
    if searched:
        raise ValueError(f"--set {searched[0]}={cli[searched[0]]!r}: this key is searched by the space")
    validation = {f"validation.{k}": v for k, v in dataclasses.asdict(space.validation).items()}
    # one replace, validated once: later sources win, checks see the combination
    cfg = train.replace(**{**space.overrides, **space.resources.overrides(), **validation, **cli})
    data_dir = Path(cfg.data.data_dir).expanduser()
    if data_dir.exists():
        cfg = cfg.replace(**{"data.data_dir": str(data_dir.resolve())})
    return cfg


# -- the trial -----------------------------------------------------------------------------------------


def _run_trial(config: dict[str, Any], *, base: dict[str, Any], dists: Sequence[Distribution], search: str,
               experiment: str, tracking_uri: str, parent_run_id: str, storage_path: str,
               object_storage_env: dict[str, str] | None = None) -> None:
    """One Tune trial: its TrainConfig, an MLflow child run, and a Ray Train fit whose per-epoch metrics
    are forwarded to Tune. ``object_storage_env``: the driver's object-storage settings (endpoint, region,
    credential-file paths; never keys), set in the trial's process before it opens ``storage_path``."""
    import ray.tune

    os.environ.update(object_storage_env or {})
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    base_cfg = TrainConfig.from_dict(base)
    overrides = trial_overrides(config, dists, base_cfg)
    cfg = base_cfg.replace(**overrides, **{"run.storage_path": storage_path, "run.name": None})
    run_name = f"{search}_{trial_id}"
    tags = {TRIAL_ID_TAG: trial_id, SEARCH_TAG: search, "adre_ray.job": "tune-trial",
            "adre_ray.loss": cfg.loss.name, "adre_ray.model": cfg.model}
    earlier = _earlier_run(experiment, tracking_uri,
                           {TRIAL_ID_TAG: trial_id, "mlflow.parentRunId": parent_run_id})
    with mlflow_run(experiment, run_name, tracking_uri=tracking_uri, run_id=earlier,
                    parent_run_id=None if earlier else (parent_run_id or None),
                    tags=None if earlier else tags) as run:
        run_id = run.info.run_id
        log_config(cfg, run_id=run_id or None, tracking_uri=tracking_uri)
        trainer = build_trainer(cfg, run_name=trial_id,
                                extra_loop_config={MLFLOW_RUN_ID_KEY: run_id, TRACKING_URI_KEY: tracking_uri})
        trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), TuneReportCallback()]
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            raise result.error


def _earlier_run(experiment: str, tracking_uri: str, tags: Mapping[str, str]) -> str | None:
    """The newest MLflow run of ``experiment`` carrying all ``tags`` (a run of an interrupted search, to
    continue), or None (also with tracking off or without a parent id)."""
    if tracking_uri == DISABLED or not all(tags.values()):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs([found.experiment_id], filter_string=query,
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# -- the search ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOutcome:
    """What a search produced: the output folder, the trials' table, the best trial (None if no trial
    finished with the objective) and the MLflow parent run id ("" with tracking off)."""

    output_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: TrainConfig | None
    parent_run_id: str


def auto_max_concurrent(cfg: TrainConfig) -> int:
    """Trials the cluster holds at once: min(CPUs / CPUs per trial, GPUs / GPUs per trial), at least 1,
    counting what the autoscaler can add (its node types' maximum): pending trials' placement groups are
    the demand that makes it add nodes, so trials are not serialized on the nodes up now."""
    facts = cluster_facts()
    total = {key: facts.most(key) for key in ("CPU", "GPU")}
    s = cfg.scaling
    limits = [int(total.get("CPU", 0) // (s.num_workers * s.cpus_per_worker))]
    if s.use_gpu:
        limits.append(int(total.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    fits = min(limits)
    if fits < 1:
        print(f"[adre-ray tune] warning: one trial needs {s.num_workers} x {s.cpus_per_worker} CPU"
              + (f" + {s.gpus_per_worker} GPU" if s.use_gpu else "") + f" but the cluster has {dict(total)} "
              "now: trials wait for an autoscaler", file=sys.stderr, flush=True)
    return max(1, fits)


def _scheduler(space: TuneSpace, base: TrainConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode,
                         max_t=s.max_t or max_epochs(space, base), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _trial_rows(results: Any, space: TuneSpace, base: TrainConfig) -> list[dict[str, Any]]:
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


def _best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The COMPLETED trial with the best finite ``metric`` (ties: the first trial)."""
    candidates = [r for r in rows if r["status"] == "COMPLETED" and _finite(r.get(metric))]
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda r: sign * float(r[metric]))


def _yaml_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _yaml_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_plain(v) for v in value]
    return _plain(value)


def write_best_config(path: Path, cfg: TrainConfig, best: Mapping[str, Any], metric: str) -> None:
    """The best trial's TrainConfig as YAML (``adre-ray train --config`` reads it), with a header."""
    header = (f"# Best trial {best['trial_id']} of an adre-ray tune search: {metric} = {best[metric]!r}\n"
              f"# (approx_* = certified-validation ESTIMATE with small n; certify the final model for real\n"
              f"# figures). Retrain with: adre-ray train --config {path.name}\n")
    path.write_text(header + yaml.safe_dump(_yaml_plain(cfg.to_dict()), sort_keys=False))


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _close_child_runs(rows: list[dict[str, Any]], parent_run_id: str, experiment: str, tracking_uri: str
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


@contextlib.contextmanager
def _no_keys_to_trials():
    """Keep the driver's object-storage keys out of the trials' ``runtime_env`` while Tune runs.

    Ray Tune copies the driver's ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``
    into every trainable's ``runtime_env`` (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and
    Ray's runtime_env agent writes each runtime_env to a world-readable log. Trials read their node's own
    credential chain instead, as certification actors and training workers do (``CREDENTIAL_ENV_VARS``).
    """
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Ray without this module propagates nothing
        yield
        return
    propagated = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - {*CREDENTIAL_ENV_VARS, "AWS_SECURITY_TOKEN"}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = propagated


def run_search(train: TrainConfig, space: TuneSpace, *, cli_overrides: Mapping[str, Any] | None = None,
               verbose: int = 1) -> SearchOutcome:
    """Run the search on the connected Ray cluster (see the module docstring) and write its outputs."""
    import ray.tune
    from ray.tune.search import BasicVariantGenerator

    base = trial_base_config(train, space, cli_overrides)
    check_space_against(space, base)
    name = space.name or f"tune_{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(space.output_dir).expanduser().resolve() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    # Tune state and Train checkpoints: beside the outputs, or under the train config's cloud storage URI
    # (a multi-node cluster needs storage every node reaches)
    storage = str(out_dir) if is_local_storage(base.run.storage_path) else \
        f"{base.run.storage_path.rstrip('/')}/{name}"
    # base, not train: a --set run.tracking_uri=... must be honoured (best_config.yaml records it)
    tracking_uri = resolve_tracking_uri(space.tracking_uri or base.run.tracking_uri)
    check_train_paths(base, tracking_uri)
    dists = space.distributions()
    max_concurrent = space.max_concurrent or auto_max_concurrent(base)
    tune_storage = ray_storage(storage)  # object storage: the filesystem with its endpoint, no keys
    filesystem = tune_storage.get("storage_filesystem")
    experiment_path = f"{tune_storage['storage_path'].rstrip('/')}/{TUNE_DIRNAME}"
    restoring = ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    search_tags = {"adre_ray.job": "tune", SEARCH_TAG: name}
    earlier_parent = _earlier_run(space.experiment, tracking_uri, search_tags) if restoring else None
    with mlflow_run(space.experiment, name, tracking_uri=tracking_uri, run_id=earlier_parent,
                    tags=None if earlier_parent else search_tags) as parent:
        parent_id = parent.info.run_id
        params = {**{f"space.{k}": v for k, v in space.flat_dict().items()},
                  **{f"base.{k}": v for k, v in base.flat_dict().items() if not k.startswith("validation.")},
                  "max_concurrent": max_concurrent}
        log_config(params, run_id=parent_id or None, tracking_uri=tracking_uri)
        trainable = ray.tune.with_parameters(
            _run_trial, base=base.to_dict(), dists=dists, search=name, experiment=space.experiment,
            tracking_uri=tracking_uri, parent_run_id=parent_id, storage_path=f"{storage}/train",
            object_storage_env=storage_env())
        search_alg = BasicVariantGenerator(random_state=space.seed, max_concurrent=max_concurrent)
        if restoring:  # an interrupted run of this search: Tune's own restore, finished trials kept
            tuner = ray.tune.Tuner.restore(experiment_path, ray.tune.with_resources(trainable,
                                                                                    TRIAL_DRIVER_RESOURCES),
                                           resume_unfinished=True, resume_errored=True,
                                           storage_filesystem=filesystem)
            print(f"[adre-ray tune] resuming search {name!r} from {experiment_path}", flush=True)
        else:
            tuner = ray.tune.Tuner(
                ray.tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES),
                param_space=param_space(space),
                tune_config=ray.tune.TuneConfig(num_samples=space.num_samples,
                                                scheduler=_scheduler(space, base), search_alg=search_alg),
                run_config=ray.tune.RunConfig(name=TUNE_DIRNAME, verbose=verbose, **tune_storage),
            )
        print(f"[adre-ray tune] search {name!r}: {len(dists)} searched key(s), up to {max_concurrent} "
              f"trial(s) at once; outputs in {out_dir}", flush=True)
        with _no_keys_to_trials():
            results = tuner.fit()
        rows = _trial_rows(results, space, base)
        if tracking_uri != DISABLED and parent_id:
            _close_child_runs(rows, parent_id, space.experiment, tracking_uri)
        best = _best_row(rows, space.metric, space.mode)
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


# -- command line --------------------------------------------------------------------------------------


build_parser = tune_parser


def main(argv: Sequence[str] | None = None) -> int:
    """``adre-ray tune``: 0 when a best trial was found, 1 when no trial finished, 2 on a config error."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        space = load_space(args.space, {"num_samples": args.num_samples, "name": args.name,
                                        "max_concurrent": args.max_concurrent, "output_dir": args.output_dir})
        train = load_config(TrainConfig, args.config)
        cli = parse_overrides(args.set)
        check_space_against(space, trial_base_config(train, space, cli))
    except ValueError as err:
        print(f"adre-ray tune: error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    started = False
    try:
        started = connect_ray(args.address)
        outcome = run_search(train, space, cli_overrides=cli)
    except ValueError as err:
        print(f"adre-ray tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return interrupted("tune", stop)
    finally:
        if started:
            import ray

            ray.shutdown()
    _print_summary(outcome, space)
    return 0 if outcome.best is not None else 1


def _print_summary(outcome: SearchOutcome, space: TuneSpace) -> None:
    keys = [d.key for d in space.distributions()]
    print(f"\n{'trial':<20} {'status':<10} " + " ".join(f"{k:>14}" for k in keys) + f" {space.metric:>18}")
    for row in outcome.rows:
        values = " ".join(f"{row[k]!s:>14.14}" for k in keys)
        print(f"{row['trial_id']!s:<20} {row['status']:<10} {values} {row[space.metric]:>18.4f}")
    if outcome.best is None:
        print(f"\nno trial finished with a finite {space.metric!r}; "
              f"see {outcome.output_dir / TRIALS_FILENAME}")
        return
    best = outcome.best
    print(f"\nbest trial {best['trial_id']}: {space.metric} = {best[space.metric]:.4f} with "
          + ", ".join(f"{k}={best[k]!r}" for k in keys))
    print(f"best config: {outcome.output_dir / BEST_CONFIG_FILENAME}")
    print(f"all trials:  {outcome.output_dir / TRIALS_FILENAME}")
    if outcome.parent_run_id:
        print(f"MLflow parent run: {outcome.parent_run_id}")


if __name__ == "__main__":
    sys.exit(main())
