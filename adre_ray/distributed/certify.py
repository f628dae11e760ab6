"""Distributed certification: the n0 + n Monte Carlo draws of each image sharded over a pool of Ray actors.

Algorithm of the driver (``run_certification``):

1. select images start, start + skip, ... (at most ``max_images``), drop those already in the output
   folder (resume), and check/write the folder's manifest (``adre_ray.analysis.results``);
2. cut the n0 pilot draws and the n estimation draws of each image into shards of ``shard_size``; the
   shard (idx, stream, s) is sampled with noise seeded by (seed, idx, stream, s), so the summed counts,
   and hence every row, are the same whatever the number of actors, the order or a re-run;
3. keep ~2 shards queued per actor, admitting new images as earlier ones drain;
4. when an image's shards are all summed, compute PREDICT (main counts), CERTIFY and T-CERTIFY (pilot +
   main counts) with ``adre_ray.smoothing``, and buffer the row; write buffered rows as an atomic Parquet
   part every ``flush_images`` images or ``flush_seconds``;
5. a task that fails because its actor died is re-queued and the actor replaced (up to
   ``actor_restarts`` times per slot), so the output equals an undisturbed run;
6. summarize (certified accuracy at 0, 0.25, ..., 2.0, ACR, abstain rates) and log to MLflow.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from adre_ray import storage
from adre_ray.analysis.metrics import DEFAULT_RADII, mlflow_metrics, summarize
from adre_ray.analysis.output_folder import check_output_dir, output_folder_lock
from adre_ray.analysis.results import completed_indices, ensure_manifest, read_results, write_part
from adre_ray.config.base import load_config
from adre_ray.config.certify import ABSTAINING_SHORTCUTS, CertifyConfig
from adre_ray.config.flags import SuggestingParser, add_field_flags, flag_values
from adre_ray.data import build_dataset, dataset_info, load_images
from adre_ray.distributed._common import ADDRESS_HELP, connect_ray, interrupted, os_error_message
from adre_ray.distributed.actors import CertifyActor
from adre_ray.models.checkpoint import CHECKPOINT_FILENAME, read_checkpoint
from adre_ray.models.model_fn import model_fn_identity
from adre_ray.smoothing import (
    ABSTAIN,
    MAIN_STREAM,
    NOISE_SCHEME,
    PILOT_STREAM,
    certify_counts,
    predict_counts,
    tcertify_counts,
)
from adre_ray.smoothing.certify import effective_pb_bound
from adre_ray.smoothing.sequential import DecidePlan, Stop, TargetPlan, decide_plan, target_plan
from adre_ray.smoothing.shortcuts import (
    certify_threshold,
    iss_sample_size,
    should_stop_early,
    wave_level,
)
from adre_ray.tracking import log_artifact, log_config, log_metrics, mlflow_run, set_tags
from adre_ray.tracking.runs import DISABLED, resolve_tracking_uri

TASKS_PER_ACTOR = 2
"""Shards queued per actor: one running, one ready, so an actor never waits for the driver."""

LOAD_CHUNK = 64
"""Images decoded per ``load_images`` call (memory stays bounded on ImageNet)."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: ``num`` draws of ``stream`` (pilot or main) for image ``idx``, shard ``shard``."""

    idx: int
    stream: int
    shard: int
    num: int


@dataclass
class CertifyResult:
    """What ``run_certification`` returns: the result folder, the summary of its selected images, the run."""

    output_dir: Path | str
    summary: dict[str, float]
    mlflow_run_id: str | None
    images_certified: int = 0
    samples_per_s: float = 0.0


@dataclass
class CertifyHooks:
    """Test / monitoring hooks, called on the driver. An exception raised in a hook stops the run after
    the finished images are written (the run then resumes cleanly).

    on_shard_done(pool, task)  after a shard's counts were summed
    on_part_written(path)      after each Parquet part is in place
    """

    on_shard_done: Callable[[CertifyPool, ShardTask], None] | None = None
    on_part_written: Callable[[Path | str], None] | None = None


# --------------------------------------------------------------------------------------------- planning


def shard_plan(idx: int, n0: int, n: int, shard_size: int) -> list[ShardTask]:
    """The shards of one image: ceil(n0 / shard_size) pilot ones, then ceil(n / shard_size) main ones.

    Every shard holds ``shard_size`` draws except the last of each stream (the remainder).
    """
    tasks = []
    for stream, total in ((PILOT_STREAM, n0), (MAIN_STREAM, n)):
        for shard, begin in enumerate(range(0, total, shard_size)):
            tasks.append(ShardTask(idx, stream, shard, min(shard_size, total - begin)))
    return tasks


def select_indices(cfg: CertifyConfig, split_size: int) -> list[int]:
    """Images start, start + skip, ... below ``split_size``, at most ``max_images`` of them."""
    chosen = range(cfg.start, split_size, cfg.skip)
    if cfg.max_images is not None:
        chosen = chosen[: cfg.max_images]
    return list(chosen)


def result_row(idx: int, label: int, pilot_counts: np.ndarray, counts: np.ndarray, *, sigma: float,
               alpha: float, mode: str, grid: Sequence[float], seed: int, time_s: float, checkpoint: str,
               train_run_id: str | None, pb_bound: str = "sum", shortcut: str = "none",
               train_sigma: float | None = None, level: float | None = None,
               target_radius: float | None = None, decision: str | None = None) -> dict[str, Any]:
    """One ``RESULT_SCHEMA`` row: PREDICT on ``counts``, CERTIFY and T-CERTIFY on (pilot_counts, counts).

    CERTIFY and T-CERTIFY see the same counts and the same pilot class cA, so T-CERTIFY's radius is
    >= CERTIFY's whenever the grid holds 1.0 (mode paper; see adre_ray.smoothing.certify).
    ``counts`` are the main draws actually made (``n`` = their sum, ``samples_used`` = n0 + n).
    ``shortcut`` in ``ABSTAINING_SHORTCUTS`` (skipped_misclassified: no main draws; early_abstain: the
    draws made before the stop) gives an abstention row: both methods -1, radius 0, not correct, the
    bounds NaN; ``predict`` is then PREDICT on the draws made (the pilot's when there are none).
    ``level``: the level CERTIFY and T-CERTIFY are computed at (default ``alpha``; a sequential look's
    share of alpha, adre_ray.smoothing.sequential); ``alpha`` stays the overall guarantee.
    """
    pilot_counts = np.asarray(pilot_counts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    level = alpha if level is None else level
    samples = {"samples_used": int(pilot_counts.sum() + counts.sum()), "shortcut": shortcut,
               "certify_level": float(level), "target_radius": target_radius, "decision": decision}
    if shortcut in ABSTAINING_SHORTCUTS:
        predicted = predict_counts(counts if counts.sum() > 0 else pilot_counts, alpha)
        return {
            "idx": int(idx), "label": int(label), "predict": int(predicted.predict),
            "correct": False, "correct_tcertify": False, "certify_predict": ABSTAIN,
            "tcertify_predict": ABSTAIN, "radius_certify": 0.0, "radius_tcertify": 0.0,
            "tcertify_mode": mode, "pA_lower": math.nan, "pB_upper": math.nan, "alpha_prime": math.nan,
            "pA_lower_certify": math.nan, "counts": counts.tolist(), "pilot_counts": pilot_counts.tolist(),
            "n0": int(pilot_counts.sum()), "n": int(counts.sum()),
            "alpha": float(alpha), "sigma": float(sigma), "seed": int(seed), "time_s": float(time_s),
            "checkpoint": checkpoint, "train_run_id": train_run_id,
            "train_sigma": None if train_sigma is None else float(train_sigma),
            "pb_bound": effective_pb_bound(mode, pb_bound), "noise_scheme": NOISE_SCHEME, **samples,
        }
    predicted = predict_counts(counts, alpha)
    certified = certify_counts(pilot_counts, counts, sigma, level)
    tcertified = tcertify_counts(pilot_counts, counts, sigma, level, mode=mode, grid=tuple(grid),
                                 pb_bound=pb_bound)
    return {
        "idx": int(idx), "label": int(label),
        "predict": int(predicted.predict),
        "correct": bool(certified.predict == label),
        "correct_tcertify": bool(tcertified.predict == label),
        "certify_predict": int(certified.predict),
        "tcertify_predict": int(tcertified.predict),
        "radius_certify": float(certified.radius),
        "radius_tcertify": float(tcertified.radius),
        "tcertify_mode": mode,
        "pA_lower": float(tcertified.pA_lower),
        "pB_upper": float(tcertified.pB_upper),
        "alpha_prime": float(tcertified.alpha_prime),
        "pA_lower_certify": float(certified.pA_lower),
        "counts": counts.tolist(),
        "pilot_counts": pilot_counts.tolist(),
        "n0": int(pilot_counts.sum()), "n": int(counts.sum()),
        "alpha": float(alpha), "sigma": float(sigma), "seed": int(seed),
        "time_s": float(time_s),
        "checkpoint": checkpoint,
        "train_run_id": train_run_id,
        "train_sigma": None if train_sigma is None else float(train_sigma),
        "pb_bound": tcertified.pb_bound, "noise_scheme": NOISE_SCHEME, **samples,
    }


# ------------------------------------------------------------------------------------------------- pool


class CertifyPool:
    """Actor slots holding one model each; a slot whose actor died gets a fresh actor (``replace``).

    ``actors[i]`` is the current actor of slot i; ``generation[i]`` counts its replacements, so the
    several failed tasks of one dead actor replace it only once. A pool may serve several runs of the
    same checkpoint (``run_certification(cfg, pool=pool)``): actors stay warm, ``configure`` sets each
    run's sigma, seed and batch size.
    """

    def __init__(self, checkpoint: str, *, num_actors: int, num_classes: int, use_gpu: bool,
                 sigma: float, seed: int = 0, batch_size: int = 1000, amp: bool = True,
                 channels_last: bool = True, max_replacements: int = 3, model_fn: str | None = None,
                 compile: bool = False, cuda_graphs: bool = False) -> None:
        if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"num_actors={num_actors!r}: must be an integer >= 1")
        self.checkpoint = (model_fn_identity(model_fn) if model_fn is not None
                           else storage.identity(checkpoint))
        self.num_classes = num_classes
        self.use_gpu = use_gpu
        self.actor_options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0,
                                              "max_restarts": 0}
        if storage.is_remote(self.checkpoint) and storage.storage_env():  # actors read it from the store
            self.actor_options["runtime_env"] = {"env_vars": storage.storage_env()}
        self.actor_kwargs: dict[str, Any] = {
            "checkpoint": self.checkpoint, "num_classes": num_classes, "sigma": sigma, "seed": seed,
            "batch_size": batch_size, "device": "cuda" if use_gpu else "cpu", "amp": amp,
            "channels_last": channels_last, "cpu_threads": 1, "model_fn": model_fn, "compile": compile,
            "cuda_graphs": cuda_graphs}
        self.max_replacements = max_replacements
        self.actors = [self._new_actor() for _ in range(num_actors)]
        self.generation = [0] * num_actors
        self.load = [0] * num_actors
        self.replacements = 0

    def _new_actor(self) -> Any:
        return CertifyActor.options(**self.actor_options).remote(**self.actor_kwargs)

    def __len__(self) -> int:
        return len(self.actors)

    def configure(self, *, sigma: float, seed: int, batch_size: int) -> None:
        """Set a run's settings on every actor (ordered before its tasks; replacements get them too)."""
        self.actor_kwargs.update(sigma=sigma, seed=seed, batch_size=batch_size)
        for actor in self.actors:
            actor.configure.remote(sigma=sigma, seed=seed, batch_size=batch_size)
        self.load = [0] * len(self.actors)

    def submit(self, slot: int, image_ref: Any, task: ShardTask) -> Any:
        self.load[slot] += 1
        return self.actors[slot].count_timed.remote(image_ref, task.idx, task.stream, task.shard, task.num)

    def replace(self, slot: int, generation: int, error: BaseException) -> None:
        """Give slot ``slot`` a new actor, unless that already happened since ``generation``."""
        if self.generation[slot] != generation:
            return
        if self.generation[slot] >= self.max_replacements:
            raise RuntimeError(f"certification actor slot {slot} died {self.generation[slot] + 1} times "
                               f"(actor_restarts={self.max_replacements}); last error: {error}") from error
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        self.generation[slot] += 1
        self.replacements += 1

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def make_pool(cfg: CertifyConfig) -> CertifyPool:
    """A pool for ``cfg`` (sigma resolved): ``num_actors`` actors, or one per GPU / CPU of the cluster."""
    _ensure_ray()
    if cfg.sigma is None:
        cfg, _ = resolve_settings(cfg)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    return CertifyPool(cfg.checkpoint, num_actors=_pool_size(cfg, use_gpu),
                       num_classes=dataset_info(cfg.dataset).num_classes, use_gpu=use_gpu,
                       sigma=cfg.sigma, seed=cfg.seed, batch_size=cfg.batch_size,  # type: ignore[arg-type]
                       amp=cfg.amp, channels_last=cfg.channels_last, max_replacements=cfg.actor_restarts,
                       model_fn=cfg.model_fn, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)


@dataclass
class _Image:
    idx: int
    label: int
    ref: Any
    remaining: int
    pilot: np.ndarray
    counts: np.ndarray
    time_s: float = 0.0
    main_todo: list[ShardTask] = field(default_factory=list)  # main shards not yet queued (shortcuts)
    main_started: bool = False  # main shards were planned (shortcut runs plan them after the pilot)
    n: int = 0  # main draws this image makes at most (cfg.n, or its ISS choice)
    made: int = 0  # main draws summed so far
    threshold: int = 0  # early abstain: CERTIFY certifies iff N_A >= threshold (at this image's n)
    level: float = 0.0  # early abstain: level of each check
    shortcut: str = "none"
    plan: DecidePlan | TargetPlan | None = None  # stop_when_decided / target_radius: the looks and tests
    verdict: Stop | None = None  # the look that stopped the image


@dataclass
class _Progress:
    done: int = 0
    abstain_certify: int = 0
    abstain_tcertify: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def samples_per_s(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.samples / elapsed if elapsed > 0 else 0.0


# ----------------------------------------------------------------------------------------------- driver


def _ensure_ray() -> None:
    if not ray.is_initialized():
        connect_ray()


def checkpoint_facts(checkpoint: str, num_classes: int) -> tuple[float | None, str | None]:
    """(training sigma, training MLflow run id) from the checkpoint's ``extra``, each None if absent.

    sigma is the shallowest ``sigma`` (or ``<section>.sigma``) key in ``extra`` and its nested dicts
    (e.g. ``extra["sigma"]`` or ``extra["config"]["loss"]["sigma"]``); the run id is
    ``extra["mlflow_run_id"]``. Reads the file only (no model is built).
    """
    record = read_checkpoint(checkpoint)
    if record["num_classes"] != num_classes:
        raise ValueError(f"checkpoint={checkpoint!r}: num_classes={record['num_classes']} but the dataset "
                         f"has {num_classes} classes")
    extra = record.get("extra") or {}
    run_id = extra.get("mlflow_run_id")
    sigma = None
    level: list[dict[str, Any]] = [extra]
    while level and sigma is None:
        for section in level:
            for key, value in section.items():
                if (key == "sigma" or str(key).endswith(".sigma")) and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    sigma = float(value)
                    break
            if sigma is not None:
                break
        level = [v for section in level for v in section.values() if isinstance(v, dict)]
    return sigma, (str(run_id) if run_id else None)


def _pool_size(cfg: CertifyConfig, use_gpu: bool) -> int:
    """Actors the pool gets: ``num_actors``, or one per FREE GPU / CPU (``ray.available_resources``).

    Each actor needs one CPU (or one GPU). When fewer are free than wanted (held by a pool just shut
    down, by another job, or not yet added by an autoscaler), this waits at most ``resource_wait_s``
    seconds, saying so on stderr, then refuses (``ValueError`` naming ``num_actors`` and the counts): an
    actor that cannot be scheduled would make the job wait forever without a word.
    """
    key = "GPU" if use_gpu else "CPU"
    wanted = cfg.num_actors if cfg.num_actors is not None else 1
    deadline = time.monotonic() + cfg.resource_wait_s
    said = False
    while True:
        total = int(ray.cluster_resources().get(key, 0))
        free = int(ray.available_resources().get(key, 0))
        if free >= wanted:
            return cfg.num_actors if cfg.num_actors is not None else free
        if time.monotonic() >= deadline:
            if wanted > total:
                raise ValueError(f"num_actors={cfg.num_actors}: the Ray cluster has {total} {key}s in all "
                                 f"(waited {cfg.resource_wait_s:g} s) and each actor needs one; use "
                                 f"num_actors <= {total}" + ("" if total else f", or a cluster with {key}s"))
            raise ValueError(f"num_actors={cfg.num_actors}: only {free} of the cluster's {total} {key}s are "
                             f"free (other jobs or actors hold the rest; waited {cfg.resource_wait_s:g} s); "
                             f"use num_actors <= {free}" + ("" if free else " after they finish")
                             + ", a longer resource_wait_s, or another cluster (--address)")
        if not said:
            print(f"adre-ray certify: waiting up to {cfg.resource_wait_s:g} s for {wanted} free {key}(s) "
                  f"({free} of {total} free now)", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.5)


def model_identity(cfg: CertifyConfig) -> str:
    """What rows and the manifest record as the model: the resolved checkpoint path, or
    ``model_fn:<module:function>``."""
    if cfg.model_fn is not None:
        return model_fn_identity(cfg.model_fn)
    return storage.identity(cfg.checkpoint)


def model_facts(cfg: CertifyConfig) -> tuple[float | None, str | None]:
    """(training sigma, training run id) of ``cfg``'s model; (None, None) for a model_fn."""
    if cfg.model_fn is not None:
        return None, None
    return checkpoint_facts(cfg.checkpoint, dataset_info(cfg.dataset).num_classes)


def resolve_settings(cfg: CertifyConfig) -> tuple[CertifyConfig, str | None]:
    """``cfg`` with sigma filled from the checkpoint when null, and the training run id (if recorded).

    Warns (``UserWarning``) when the certification sigma differs from the recorded training sigma: the
    certificate is valid at any sigma, but a model is usually accurate under its training noise only.
    """
    cfg, train_run_id, _ = _resolve_settings(cfg)
    return cfg, train_run_id


def _resolve_settings(cfg: CertifyConfig) -> tuple[CertifyConfig, str | None, float | None]:
    """``resolve_settings`` plus the checkpoint's training sigma (None when unrecorded), from one read."""
    ckpt_sigma, train_run_id = model_facts(cfg)
    if cfg.sigma is not None and ckpt_sigma is not None and not math.isclose(cfg.sigma, ckpt_sigma):
        warnings.warn(f"sigma={cfg.sigma:g} differs from the sigma={ckpt_sigma:g} the checkpoint "
                      f"{cfg.checkpoint!r} was trained with (both are recorded in the rows: sigma, "
                      "train_sigma)", UserWarning, stacklevel=3)
    if cfg.sigma is None:
        if ckpt_sigma is None:
            raise ValueError(f"sigma=None: checkpoint {cfg.checkpoint!r} records no training sigma; "
                             "set sigma")
        cfg = dataclasses.replace(cfg, sigma=ckpt_sigma)
        cfg.validate()
    return cfg, train_run_id, ckpt_sigma


def manifest_settings(cfg: CertifyConfig) -> dict[str, Any]:
    """The settings that determine the rows (``MANIFEST_FIELDS``), plus the dataset location."""
    return {
        "checkpoint": model_identity(cfg), "dataset": cfg.dataset,
        "split": cfg.split, "sigma": cfg.sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
        "seed": cfg.seed, "mode": cfg.tcertify_mode, "grid": list(cfg.grid), "shard_size": cfg.shard_size,
        "data_dir": cfg.data_dir, "noise_scheme": NOISE_SCHEME, **shortcut_settings(cfg),
    }


def shortcut_settings(cfg: CertifyConfig) -> dict[str, Any]:
    """The manifest entries of the runner-up bound and the evaluation shortcuts (they change rows)."""
    return {
        "pb_bound": effective_pb_bound(cfg.tcertify_mode, cfg.pb_bound),
        "skip_misclassified": cfg.skip_misclassified, "early_abstain": cfg.early_abstain,
        "early_abstain_delta": cfg.early_abstain_delta, "early_abstain_wave": cfg.early_abstain_wave,
        "n_policy": cfg.n_policy, "iss_max_radius_loss": cfg.iss_max_radius_loss,
        # the rule of a run without early abstain is moot: recorded as schema 3's so old folders resume
        "early_abstain_rule": cfg.early_abstain_rule if cfg.early_abstain else "cp",
        "stop_when_decided": cfg.stop_when_decided,
        "decide_grid": None if cfg.decide_grid is None else list(cfg.decide_grid),
        "decide_delta": cfg.decide_delta, "target_radius": cfg.target_radius,
    }


MLFLOW_RUN_FILE = "mlflow_run.json"
"""In a result folder: the MLflow store and run id of the certification writing it (so a resume continues
that run instead of leaving it RUNNING and opening another)."""


def previous_certify_run(out_dir: Path | str, tracking_uri: str | None) -> str | None:
    """The run id recorded in ``out_dir`` if it belongs to the same MLflow store and still exists there
    (not deleted); None otherwise (a new run is then opened)."""
    uri = resolve_tracking_uri(tracking_uri)
    path = storage.join(out_dir, MLFLOW_RUN_FILE)
    if uri == DISABLED or storage.file_type(path) != pafs.FileType.File:
        return None
    try:
        record = json.loads(storage.read_bytes(path))
        if record.get("tracking_uri") != uri:
            return None
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(str(record["run_id"]))
    except Exception:  # unreadable record, unknown run, store moved: start a new run
        return None
    return None if run.info.lifecycle_stage == "deleted" else str(run.info.run_id)


def record_certify_run(out_dir: Path | str, tracking_uri: str | None, run_id: str) -> None:
    """Write ``out_dir/mlflow_run.json`` (atomically: rename locally, one PUT on object storage) naming
    the store and the run."""
    record = {"tracking_uri": resolve_tracking_uri(tracking_uri), "run_id": run_id}
    storage.write_bytes_atomic(storage.join(out_dir, MLFLOW_RUN_FILE), (json.dumps(record) + "\n").encode())


GENERIC_CHECKPOINT_STEMS = ("model", "checkpoint", "best", "last", "final")


def checkpoint_label(checkpoint: str) -> str:
    """A short name telling checkpoints apart: the run folder plus the checkpoint folder for Ray Train
    checkpoints (``my_run/checkpoint_epoch_000149/model.pt`` -> ``my_run-checkpoint_epoch_000149``), the
    file's stem for a named file (``basic_sigma025.pt`` -> ``basic_sigma025``), the folder and stem for a
    generic one (``runs/a/model.pt`` -> ``a-model``). Local paths and URIs alike."""
    parts = [p for p in str(checkpoint).split("?", 1)[0].replace("\\", "/").split("/") if p]
    if parts and parts[-1] == CHECKPOINT_FILENAME:
        parts = parts[:-1]
    if not parts:
        return "checkpoint"
    last = parts[-1]
    stem = last.rsplit(".", 1)[0] if "." in last else last
    if (stem.startswith("checkpoint_") or stem in GENERIC_CHECKPOINT_STEMS) and len(parts) > 1 \
            and not parts[-2].endswith(":"):
        return f"{parts[-2]}-{stem}"
    return stem


def certify_run_name(checkpoint: str, sigma: float, when: float | None = None) -> str:
    """MLflow run name ``certify-<checkpoint label>-sigma<sigma>-<YYYYmmdd-HHMMSS>`` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
    return f"certify-{checkpoint_label(checkpoint)}-sigma{sigma:g}-{stamp}"


def output_location(output_dir: str) -> Path | str:
    """The result folder: a local ``Path``, or the URI itself for object storage (``s3://``, ``gs://``)
    and ``file://`` (``adre_ray.storage``)."""
    return output_dir if storage.is_uri(output_dir) else Path(output_dir).expanduser()


def run_certification(cfg: CertifyConfig, *, hooks: CertifyHooks | None = None,
                      pool: CertifyPool | None = None) -> CertifyResult:
    """Certify the selected images of ``cfg`` into ``cfg.output_dir``; resume what is already there.

    Every selected image ends up in the folder exactly once, with the values an undisturbed
    single-actor run would give (time_s aside). ``ValueError`` for bad settings, a folder holding a
    different run, or a corrupt part. ``pool``: warm actors of the same checkpoint to use (its first
    ``num_actors`` slots, all when null); it is left running. Without it a pool is made and shut down.
    """
    cfg.validate()
    hooks = hooks or CertifyHooks()
    cfg, train_run_id, train_sigma = _resolve_settings(cfg)
    assert cfg.sigma is not None
    out_dir = output_location(cfg.output_dir)
    num_classes = dataset_info(cfg.dataset).num_classes
    split_size = len(build_dataset(cfg.dataset, cfg.data_dir, cfg.split, augment=False))  # type: ignore[arg-type]
    selected = select_indices(cfg, split_size)
    if not selected:
        raise ValueError(f"start={cfg.start}: beyond the {split_size} images of the {cfg.split!r} split")
    with output_folder_lock(out_dir):  # one run at a time per folder (released by the OS if we die)
        ensure_manifest(out_dir, manifest_settings(cfg))
        done_before = completed_indices(out_dir)
        todo = [i for i in selected if i not in done_before]

        tags = {"job": "certify", **({"train_run_id": train_run_id} if train_run_id else {})}
        run_name = certify_run_name(cfg.model_fn or cfg.checkpoint, cfg.sigma)
        previous_run_id = previous_certify_run(out_dir, cfg.tracking_uri)
        with mlflow_run(cfg.experiment, run_name=run_name, tracking_uri=cfg.tracking_uri,
                        run_id=previous_run_id, tags=None if previous_run_id else tags) as run:
            run_id = run.info.run_id or None
            if run_id and run_id != previous_run_id:
                record_certify_run(out_dir, cfg.tracking_uri, run_id)
            if run_id:
                log_config({**cfg.flat_dict(), "num_images_selected": len(selected),
                            "num_images_resumed": len(selected) - len(todo)}, tracking_uri=cfg.tracking_uri)
            progress = _certify_images_or_job_error(cfg, todo, num_classes, train_run_id, out_dir, hooks,
                                                    run_id, pool, train_sigma)
            table = read_results(out_dir)
            chosen = set(selected)
            keep = [i for i, idx in enumerate(table.column("idx").to_pylist()) if idx in chosen]
            table = table.take(keep)
            summary = summarize(table, DEFAULT_RADII)
            summary["samples_per_s"] = progress.samples_per_s()
            summary["images_certified_this_run"] = float(progress.done)
            if run_id:
                log_metrics(mlflow_metrics(summary), step=len(table), tracking_uri=cfg.tracking_uri)
                set_tags({"output_dir": storage.identity(out_dir)}, tracking_uri=cfg.tracking_uri)
                if isinstance(out_dir, Path):  # object storage stays where it is; the tag points to it
                    log_artifact(out_dir, "results", tracking_uri=cfg.tracking_uri)
    print(format_summary(summary, out_dir))
    return CertifyResult(output_dir=out_dir, summary=summary, mlflow_run_id=run_id,
                         images_certified=progress.done, samples_per_s=summary["samples_per_s"])


def _certify_images_or_job_error(*args: Any) -> _Progress:
    """``_certify_images``, with an actor's ``ValueError`` (e.g. ``NonFiniteLogitsError`` naming the
    checkpoint) re-raised as itself rather than wrapped in Ray's ``RayTaskError`` and its remote traceback,
    so ``adre-ray certify`` prints the one message and exits 2. The failed image is not written."""
    try:
        return _certify_images(*args)
    except RayTaskError as err:
        if isinstance(err.cause, ValueError):
            raise err.cause from None
        raise


def _certify_images(cfg: CertifyConfig, todo: list[int], num_classes: int, train_run_id: str | None,
                    out_dir: Path | str, hooks: CertifyHooks, run_id: str | None,
                    given_pool: CertifyPool | None, train_sigma: float | None = None) -> _Progress:
    """The scheduling loop (steps 2-5 of the module docstring). Finished rows are written even when the
    loop stops on an exception (a hook's, a KeyboardInterrupt), so a re-run only redoes unfinished images."""
    progress = _Progress()
    if not todo:
        return progress
    _ensure_ray()
    checkpoint_id = model_identity(cfg)
    if given_pool is None:
        pool = make_pool(cfg)
    else:
        pool = given_pool
        if pool.checkpoint != checkpoint_id or pool.num_classes != num_classes:
            raise ValueError(f"pool: holds checkpoint={pool.checkpoint!r} ({pool.num_classes} classes), "
                             f"not checkpoint={checkpoint_id!r} ({num_classes} classes)")
        if cfg.num_actors is not None and cfg.num_actors > len(pool):
            raise ValueError(f"num_actors={cfg.num_actors}: the given pool has only {len(pool)} actors")
        pool.configure(sigma=cfg.sigma, seed=cfg.seed, batch_size=cfg.batch_size)  # type: ignore[arg-type]
    num_actors = min(len(pool), cfg.num_actors or len(pool))
    shards_per_image = cfg.num_shards(cfg.n0) + cfg.num_shards(cfg.n)
    shortcuts = cfg.uses_shortcuts()
    if shortcuts:  # an image offers one stage (pilot, then wave by wave) at a time: admit more images
        shards_per_image = max(1, min(cfg.num_shards(cfg.n0),
                                      cfg.early_abstain_wave if cfg.early_abstain else cfg.num_shards(cfg.n)))
    in_flight_limit = cfg.images_in_flight or max(
        2, (2 if shortcuts else 1) * math.ceil(TASKS_PER_ACTOR * num_actors / shards_per_image) + 1)

    waiting: collections.deque[int] = collections.deque(todo)  # images not yet admitted
    loaded: collections.deque[tuple[int, Any, int]] = collections.deque()  # decoded, not yet admitted
    images: dict[int, _Image] = {}
    queue: collections.deque[ShardTask] = collections.deque()
    running: dict[Any, tuple[ShardTask, int, int]] = {}  # ref -> (task, slot, slot generation)
    buffer: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    bar = tqdm(total=len(todo), unit="img", desc="certify", disable=not cfg.progress, dynamic_ncols=True)

    def flush() -> None:
        nonlocal buffer, last_flush
        last_flush = time.monotonic()
        if not buffer:
            return
        rows, buffer = sorted(buffer, key=lambda r: r["idx"]), []
        path = write_part(out_dir, rows)
        if run_id:
            log_metrics({"images_done": progress.done, "samples_per_s": progress.samples_per_s()},
                        step=progress.done, tracking_uri=cfg.tracking_uri)
        if hooks.on_part_written is not None:
            hooks.on_part_written(path)

    def admit() -> None:
        while waiting or loaded:
            if len(images) >= in_flight_limit or len(queue) >= TASKS_PER_ACTOR * num_actors:
                return
            if not loaded:
                chunk = [waiting.popleft() for _ in range(min(LOAD_CHUNK, len(waiting)))]
                pixels, labels = load_images(cfg.dataset, cfg.data_dir, cfg.split, chunk)
                loaded.extend((i, pixels[k].clone(), int(labels[k])) for k, i in enumerate(chunk))
            idx, pixels, label = loaded.popleft()
            plan = shard_plan(idx, cfg.n0, 0 if shortcuts else cfg.n, cfg.shard_size)
            images[idx] = _Image(idx, label, ray.put(pixels), len(plan), np.zeros(num_classes, np.int64),
                                 np.zeros(num_classes, np.int64), n=cfg.n, main_started=not shortcuts)
            queue.extend(plan)

    def dispatch() -> None:
        while queue:
            slot = min(range(num_actors), key=lambda s: pool.load[s])
            if pool.load[slot] >= TASKS_PER_ACTOR:
                return
            task = queue.popleft()
            ref = pool.submit(slot, images[task.idx].ref, task)
            running[ref] = (task, slot, pool.generation[slot])

    def finish(image: _Image) -> None:
        row = result_row(image.idx, image.label, image.pilot, image.counts, sigma=cfg.sigma,  # type: ignore[arg-type]
                         alpha=cfg.alpha, mode=cfg.tcertify_mode, grid=cfg.grid, seed=cfg.seed,
                         time_s=image.time_s, checkpoint=checkpoint_id, train_run_id=train_run_id,
                         pb_bound=cfg.pb_bound, shortcut=image.shortcut, train_sigma=train_sigma,
                         **_sequential_row_fields(cfg, image))
        buffer.append(row)
        del images[image.idx]
        progress.done += 1
        progress.abstain_certify += row["certify_predict"] < 0
        progress.abstain_tcertify += row["tcertify_predict"] < 0
        bar.update(1)
        bar.set_postfix(abstain=progress.abstain_certify, abstain_t=progress.abstain_tcertify,
                        samples_s=f"{progress.samples_per_s():.0f}", refresh=False)

    try:
        admit()
        dispatch()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                task, slot, generation = running.pop(ref)
                pool.load[slot] -= 1
                try:
                    counts, seconds = ray.get(ref)
                except RayActorError as err:  # actor lost: the shard is re-run, the actor replaced
                    pool.replace(slot, generation, err)
                    queue.appendleft(task)
                    continue
                image = images[task.idx]
                target = image.pilot if task.stream == PILOT_STREAM else image.counts
                target += np.asarray(counts, dtype=np.int64)
                image.time_s += float(seconds)
                image.remaining -= 1
                progress.samples += task.num
                if task.stream == MAIN_STREAM:
                    image.made += task.num
                if image.remaining == 0:
                    next_wave = _next_stage(cfg, image)
                    if next_wave:
                        image.remaining = len(next_wave)
                        queue.extendleft(reversed(next_wave))  # finish started images first
                    else:
                        finish(image)
                if hooks.on_shard_done is not None:
                    hooks.on_shard_done(pool, task)
            overdue = time.monotonic() - last_flush >= cfg.flush_seconds
            if len(buffer) >= cfg.flush_images or (buffer and overdue):
                flush()
            admit()
            dispatch()
    finally:
        try:
            flush()
        finally:
            bar.close()
            if given_pool is None:
                pool.shutdown()
            else:  # a shared pool: drop this run's leftover tasks
                for ref in running:
                    ray.cancel(ref)
                pool.load = [0] * len(pool)
    return progress


def _next_stage(cfg: CertifyConfig, image: _Image) -> list[ShardTask]:
    """The shards to queue after all queued shards of a shortcut-run image were summed ([] = finished).

    After the pilot: skip the image (``skip_misclassified``, pilot class != label), or plan its main
    shards, n = cfg.n or the ISS choice from the pilot counts; then release them one wave at a time
    (``early_abstain``), checking after each wave but the last whether the image will abstain. Every
    decision is a function of counts only, and the shards are those of the full run (same noise).
    """
    if not image.main_started:
        image.main_started = True
        cA = int(np.argmax(image.pilot))
        if cfg.skip_misclassified and cA != image.label:
            image.shortcut = "skipped_misclassified"
            return []
        if cfg.n_policy == "iss":
            image.n = iss_sample_size(image.pilot, cfg.n, cfg.shard_size, cfg.sigma,  # type: ignore[arg-type]
                                      cfg.alpha, cfg.iss_max_radius_loss)
            if image.n < cfg.n:
                image.shortcut = "iss"
        image.main_todo = shard_plan(image.idx, 0, image.n, cfg.shard_size)
        if cfg.sequential():
            return _sequential_stage(cfg, image)
        if not cfg.early_abstain:
            todo, image.main_todo = image.main_todo, []
            return todo
        waves = -(-len(image.main_todo) // cfg.early_abstain_wave)
        image.level = wave_level(cfg.early_abstain_delta, waves - 1)
        image.threshold = certify_threshold(image.n, cfg.alpha)
    elif cfg.sequential():
        return _sequential_stage(cfg, image)
    elif not image.main_todo:
        return []
    elif should_stop_early(int(image.counts[int(np.argmax(image.pilot))]), image.made, image.n,
                           image.threshold, image.level, cfg.early_abstain_rule):
        image.shortcut = "early_abstain"
        image.main_todo = []
        return []
    wave, image.main_todo = image.main_todo[:cfg.early_abstain_wave], image.main_todo[cfg.early_abstain_wave:]
    return wave


def _sequential_stage(cfg: CertifyConfig, image: _Image) -> list[ShardTask]:
    """``stop_when_decided`` / ``target_radius``: after each look (1, 2, 4, ... main shards, then all)
    ask the image's plan whether to stop; otherwise release the shards up to the next look."""
    if image.plan is None:
        image.plan = (decide_plan(image.n, cfg.shard_size, cfg.sigma, cfg.alpha,  # type: ignore[arg-type]
                                  None if cfg.decide_grid is None else tuple(cfg.decide_grid),
                                  cfg.decide_delta) if cfg.stop_when_decided
                      else target_plan(image.n, cfg.shard_size, cfg.sigma, cfg.alpha,  # type: ignore[arg-type]
                                       cfg.target_radius))  # type: ignore[arg-type]
    else:
        verdict = image.plan.check(int(image.counts[int(np.argmax(image.pilot))]), image.made)
        if verdict.stop:
            image.verdict, image.main_todo = verdict, []
            if image.made < image.n:
                image.shortcut = ("early_abstain" if verdict.abstain else
                                  "decided" if cfg.stop_when_decided else "target_radius")
            return []
    upto = next(m for m in image.plan.looks if m > image.made)
    count = -(-(upto - image.made) // cfg.shard_size)
    wave, image.main_todo = image.main_todo[:count], image.main_todo[count:]
    return wave


def _sequential_row_fields(cfg: CertifyConfig, image: _Image) -> dict[str, Any]:
    """``level``, ``target_radius``, ``decision`` of a finished image's row (empty without a plan). A
    target-radius image skipped after its pilot gets decision ``abstain`` (nothing was tested)."""
    if image.verdict is None:
        return {} if cfg.target_radius is None else {"target_radius": cfg.target_radius,
                                                       "decision": "abstain"}
    return {"level": image.verdict.level, "target_radius": cfg.target_radius,
            "decision": image.verdict.decision}


def format_summary(summary: dict[str, float], out_dir: Path | str) -> str:
    """A short text table: certified accuracy per radius for CERTIFY and T-CERTIFY, ACR, abstain rates."""
    radii = [r for r in DEFAULT_RADII]
    head = "radius      " + " ".join(f"{r:>5.2f}" for r in radii) + "    ACR  abstain"
    lines = [f"results: {out_dir}  ({int(summary.get('certify/num_images', 0))} images, "
             f"{summary.get('samples_per_s', 0.0):.0f} samples/s this run)", head]
    for method in ("certify", "tcertify"):
        accs = " ".join(f"{summary[f'{method}/cert_acc@{r:.2f}']:>5.3f}" for r in radii)
        lines.append(f"{method:<11} {accs}  {summary[f'{method}/acr']:.3f}  "
                     f"{summary[f'{method}/abstain_rate']:.3f}")
    if "samples/per_image" in summary:
        taken = ", ".join(f"{key.split('/', 1)[1][:-5]} {value:.3f}" for key, value in summary.items()
                          if key.startswith("shortcut/"))
        lines.append(f"samples per image: {summary['samples/per_image']:.0f}"
                     + (f"  (shortcut rates: {taken})" if taken else ""))
    if "target/radius" in summary:
        lines.append(f"target radius {summary['target/radius']:g}: certified-correct "
                     f"{summary['target/certified_fraction']:.3f}  (decisions: " + ", ".join(
                         f"{name} {summary[f'target/{name}_rate']:.3f}"
                         for name in ("certified", "not_certified", "abstain")) + ")")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- CLI

FLAG_NAMES: dict[str, str | tuple[str, ...]] = {"tcertify_mode": "--mode", "num_actors": "--actors"}
"""Flags whose name is not the field's kebab-case name (that name works too). Every other top-level
``CertifyConfig`` field gets ``--field-name`` automatically (``config.flags.add_field_flags``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="adre-ray certify",
        description="PREDICT / CERTIFY / T-CERTIFY of a checkpoint on Ray actors (results as Parquet). "
                    "Settings come from --config, then --set, then the field flags (the last word wins).")
    parser.add_argument("--config", help="YAML file with CertifyConfig fields (default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (YAML value), repeatable (default: none)")
    add_field_flags(parser, CertifyConfig, FLAG_NAMES)
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    return parser


def config_from_args(argv: Sequence[str]) -> CertifyConfig:
    """YAML file, then ``--set`` overrides, then the field flags (the last word wins).

    Flag values are text parsed by the field's type (``1e-5``, ``100_000``, ``null``, ``0.5,1.0``), never
    as YAML, so a path is never re-interpreted.
    """
    args = build_parser().parse_args(list(argv))
    return load_config(CertifyConfig, args.config, list(args.set), values=flag_values(args, CertifyConfig))


def main(argv: Sequence[str] | None = None) -> int:
    """``adre-ray certify``: exit 0 on success, 2 on a configuration, data or output error (message on
    stderr), 130 on Ctrl-C (one line; re-running the same command resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    started = False
    try:
        cfg = config_from_args(argv)
        check_output_dir(cfg.output_dir)  # a file in the way, a read-only folder: before Ray starts
        started = connect_ray(build_parser().parse_args(argv).address)
        result = run_certification(cfg)
    except ValueError as err:
        print(f"adre-ray certify: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up while writing a part (finished parts are kept)
        print(f"adre-ray certify: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished images were written on the way out
        return interrupted("certify")
    finally:
        if started:
            ray.shutdown()
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
