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
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from adre_ray.distributed.train import build_trainer, check_train_paths
from adre_ray.distributed.train_worker import MLFLOW_RUN_ID_KEY, TRACKING_URI_KEY
from adre_ray.distributed.tune_results import (
    BEST_CONFIG_FILENAME,
    TRIAL_ID_TAG,
    TRIALS_FILENAME,
    SearchOutcome,
    record_search,
)
from adre_ray.distributed.tune_space import (
    check_space_against,
    max_epochs,
    param_space,
    trial_base_config,
    trial_overrides,
)
from adre_ray.parsers import tune_parser
from adre_ray.storage import CREDENTIAL_ENV_VARS, storage_env
from adre_ray.tracking import (
    DISABLED,
    log_config,
    mlflow_run,
    resolve_tracking_uri,
)

SEARCH_TAG = "adre_ray.search"
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
TUNE_DIRNAME = "tune"
"""Tune's experiment folder under the search's storage; ``Tuner.restore`` resumes from it."""
"""The trial function only waits on its Ray Train run: no CPU (Tune rejects an empty request)."""


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
        return record_search(results, space, base, out_dir, parent_id=parent_id, tracking_uri=tracking_uri)


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


__all__ = [  # the search driver, and the names users and tests import from here
    "BEST_CONFIG_FILENAME", "SEARCH_TAG", "TRIALS_FILENAME", "TRIAL_ID_TAG", "SearchOutcome",
    "auto_max_concurrent", "build_parser", "check_space_against", "main", "param_space", "run_search",
    "trial_base_config", "trial_overrides",
]


if __name__ == "__main__":
    sys.exit(main())
