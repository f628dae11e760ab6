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
from adre_ray.analysis.devices import record_devices
from adre_ray.analysis.metrics import DEFAULT_RADII, mlflow_metrics, summarize
from adre_ray.analysis.output_folder import check_output_dir, output_folder_lock
from adre_ray.analysis.results import (
    check_manifest_settings,
    completed_indices,
    ensure_manifest,
    read_manifest,
    read_results,
    side_file,
    write_part,
)
from adre_ray.config.certify import ABSTAINING_SHORTCUTS, CertifyConfig
from adre_ray.config.flags import load_from_args
from adre_ray.data import build_dataset, dataset_info, load_images
from adre_ray.data.datasets import arrays_dataset
from adre_ray.distributed._common import connect_ray, interrupted, os_error_message
from adre_ray.distributed.actors import CertifyActor
from adre_ray.distributed.cluster import (
    PROGRESS_EVERY_S,
    ClusterFacts,
    ask_autoscaler,
    check_cluster_paths,
    cluster_facts,
    wait_for,
)
from adre_ray.models.checkpoint import CHECKPOINT_FILENAME, read_checkpoint
from adre_ray.models.model_fn import import_paths, model_fn_identity
from adre_ray.parsers import CERTIFY_FLAG_NAMES, certify_parser
from adre_ray.precision import precision_params, resolve_precision, warn_if_emulated
from adre_ray.smoothing import (
    ABSTAIN,
    MAIN_STREAM,
    NOISE_SCHEME,
    PILOT_STREAM,
    certify_counts,
    default_noise,
    predict_counts,
    tcertify_counts,
)
from adre_ray.smoothing import noise_scheme as scheme_of_noise
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
               train_sigma: float | None = None, noise_scheme: int = NOISE_SCHEME,
               precision: str | None = None, level: float | None = None,
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
               "precision": precision, "certify_level": float(level), "target_radius": target_radius,
               "decision": decision}
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
            "pb_bound": effective_pb_bound(mode, pb_bound), "noise_scheme": noise_scheme, **samples,
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
        "pb_bound": tcertified.pb_bound, "noise_scheme": noise_scheme, **samples,
    }


# ------------------------------------------------------------------------------------------------- pool


GPU_BATCH_SIZE = 1000
CPU_BATCH_SIZE = 128
"""Default noisy images per forward pass: large on GPU; cache-sized on CPU, where batch 96-192 is 1.35-1.45x
faster than 1000 for CIFAR models (benchmarks/RESULTS.md, "Batch size on CPU")."""


def actor_batch_size(batch_size: int | None, use_gpu: bool) -> int:
    """``batch_size``, or the device's default when it is None."""
    if batch_size is not None:
        return batch_size
    return GPU_BATCH_SIZE if use_gpu else CPU_BATCH_SIZE


class CertifyPool:
    """Actor slots holding one model each; a slot whose actor died gets a fresh actor (``replace``).

    ``actors[i]`` is the current actor of slot i (None while the slot waits for a node); ``generation[i]``
    counts its replacements, so the several failed tasks of one dead actor replace it only once. A dead
    actor is replaced at once when the cluster has a free CPU / GPU for it, else its slot is emptied and
    ``grow`` refills it when a node arrives (a lost node never blocks the run while other actors live).
    ``target`` is the size the pool grows to as nodes arrive (an autoscaler adding them). A pool may serve
    several runs of the same checkpoint (``run_certification(cfg, pool=pool)``): actors stay warm,
    ``configure`` sets each run's sigma, seed and batch size.
    """

    def __init__(self, checkpoint: str, *, num_actors: int, num_classes: int | None, use_gpu: bool,
                 sigma: float, seed: int = 0, batch_size: int | None = None, precision: str = "fp32",
                 channels_last: bool = True, max_replacements: int = 3, model_fn: str | None = None,
                 compile: bool = False, cuda_graphs: bool = False, deterministic: bool = False,
                 target: int | None = None) -> None:
        if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"num_actors={num_actors!r}: must be an integer >= 1")
        self.checkpoint = (model_fn_identity(model_fn) if model_fn is not None
                           else storage.identity(checkpoint))
        self.num_classes = num_classes
        self.use_gpu = use_gpu
        self.resource = "GPU" if use_gpu else "CPU"
        self.actor_options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0,
                                              "max_restarts": 0}
        if storage.is_remote(self.checkpoint) and storage.storage_env():  # actors read it from the store
            self.actor_options["runtime_env"] = {"env_vars": storage.storage_env()}
        self.actor_kwargs: dict[str, Any] = {
            "checkpoint": self.checkpoint, "num_classes": num_classes, "sigma": sigma, "seed": seed,
            "batch_size": actor_batch_size(batch_size, use_gpu), "device": "cuda" if use_gpu else "cpu",
            "precision": precision,
            "channels_last": channels_last, "cpu_threads": 1, "model_fn": model_fn, "compile": compile,
            "cuda_graphs": cuda_graphs, "deterministic": deterministic, "import_paths": import_paths()}
        self.max_replacements = max_replacements
        self._facts: dict[Any, Any] = {}  # actor -> ref of its device facts
        self.actors: list[Any] = [self._new_actor() for _ in range(num_actors)]
        self.generation = [0] * num_actors
        self.load = [0] * num_actors
        self.replacements = 0
        self.target = max(num_actors, target or num_actors)
        self.asked_autoscaler = False  # make_pool sets it when it asked for the target's resources
        self._looked = 0.0

    def _new_actor(self) -> Any:
        """A new actor, asked for its device facts at once (its first task, answered as soon as it is up,
        so reading them later never waits on an actor that has since stopped answering)."""
        actor = CertifyActor.options(**self.actor_options).remote(**self.actor_kwargs)
        self._facts[actor] = actor.device_facts.remote()
        return actor

    def __len__(self) -> int:
        return len(self.actors)

    def live(self, limit: int | None = None) -> list[int]:
        """Slots (among the first ``limit``) that hold an actor."""
        slots = range(min(limit or len(self.actors), len(self.actors)))
        return [s for s in slots if self.actors[s] is not None]

    def configure(self, *, sigma: float, seed: int, batch_size: int | None) -> None:
        """Set a run's settings on every actor (ordered before its tasks; replacements get them too)."""
        batch_size = actor_batch_size(batch_size, self.use_gpu)
        self.actor_kwargs.update(sigma=sigma, seed=seed, batch_size=batch_size)
        for actor in self.actors:
            if actor is not None:
                actor.configure.remote(sigma=sigma, seed=seed, batch_size=batch_size)
        self.load = [0] * len(self.actors)

    def device_facts(self, num_actors: int | None = None,
                     timeout_s: float | None = None) -> list[dict[str, Any]]:
        """``adre_ray.device.device_facts`` of the live actors among the first ``num_actors`` (all when
        None), waiting at most ``timeout_s`` for actors still starting. An actor that could not start (no
        usable CUDA, a model that fails to load): ``ValueError`` with its reason."""
        refs = [self._facts[self.actors[slot]] for slot in self.live(num_actors)]
        try:
            return ray.get(refs, timeout=timeout_s)
        except RayActorError as err:
            raise ValueError(f"certification actors could not start: {err}") from None
        except ray.exceptions.GetTimeoutError:
            raise ValueError(f"stall_timeout_s={timeout_s:g}: the certification actors did not start within "
                             f"{timeout_s:g} s (not schedulable, or their node is gone); see `ray status`"
                             ) from None

    def submit(self, slot: int, image_ref: Any, task: ShardTask) -> Any:
        self.load[slot] += 1
        return self.actors[slot].count_timed.remote(image_ref, task.idx, task.stream, task.shard, task.num)

    def _free(self) -> int:
        return int(ray.available_resources().get(self.resource, 0))

    def replace(self, slot: int, generation: int, error: BaseException) -> None:
        """Give slot ``slot`` a new actor, unless that already happened since ``generation``; with no free
        CPU / GPU for it (its node is gone), empty the slot for ``grow`` to refill."""
        if self.generation[slot] != generation:
            return
        if self.generation[slot] >= self.max_replacements:
            raise RuntimeError(f"certification actor slot {slot} died {self.generation[slot] + 1} times "
                               f"(actor_restarts={self.max_replacements}); last error: {error}") from error
        if self.actors[slot] is not None:
            ray.kill(self.actors[slot], no_restart=True)
            self._facts.pop(self.actors[slot], None)  # a dead actor's facts are never read
        self.generation[slot] += 1
        self.replacements += 1
        self.actors[slot] = self._new_actor() if self._free() >= 1 else None

    def grow(self, limit: int, every_s: float = 1.0) -> int:
        """Start actors on free CPUs / GPUs (a node arrived): refill empty slots, then add slots up to
        ``min(target, limit)``; looks at the cluster at most every ``every_s`` seconds. Returns the
        number of actors started."""
        if len(self.live(limit)) >= min(self.target, limit) or time.monotonic() - self._looked < every_s:
            return 0
        self._looked = time.monotonic()
        free = self._free()
        started = 0
        for slot in range(min(limit, len(self.actors))):
            if self.actors[slot] is None and started < free:
                self.actors[slot] = self._new_actor()
                started += 1
        while len(self.actors) < min(self.target, limit) and started < free:
            self.actors.append(self._new_actor())
            self.generation.append(0)
            self.load.append(0)
            started += 1
        return started

    def shutdown(self) -> None:
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.asked_autoscaler:
            ask_autoscaler([])  # withdraw the standing request
            self.asked_autoscaler = False


def choose_use_gpu(cfg: CertifyConfig, facts: ClusterFacts) -> bool:
    """``use_gpu``, or when null: GPU actors if the cluster has a GPU or its autoscaler can add one (a
    fresh cluster.yaml cluster has no GPU node yet and a head with CPU: 0)."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return facts.total.get("GPU", 0) >= 1 or facts.can_add("GPU")


def make_pool(cfg: CertifyConfig) -> CertifyPool:
    """A pool for ``cfg`` (sigma resolved): ``num_actors`` actors, or one per GPU / CPU of the cluster;
    on an autoscaling cluster, asks for the actors' resources and grows as nodes arrive."""
    _ensure_ray()
    if cfg.sigma is None:
        cfg, _ = resolve_settings(cfg)
    facts = cluster_facts()
    use_gpu = choose_use_gpu(cfg, facts)
    now, target = pool_plan(cfg, use_gpu, facts)
    pool = CertifyPool(cfg.checkpoint, num_actors=now, target=target,
                       num_classes=declared_num_classes(cfg), use_gpu=use_gpu,
                       sigma=cfg.sigma, seed=cfg.seed, batch_size=cfg.batch_size,  # type: ignore[arg-type]
                       precision=resolve_precision(cfg.precision_setting, "cuda" if use_gpu else "cpu"),
                       channels_last=cfg.channels_last, max_replacements=cfg.actor_restarts,
                       model_fn=cfg.model_fn, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
                       deterministic=cfg.deterministic)
    pool.asked_autoscaler = facts.can_add(pool.resource)
    return pool


def resolve_use_gpu(cfg: CertifyConfig) -> bool:
    """``cfg.use_gpu``, or (null) ``choose_use_gpu`` on the cluster's facts (connecting to Ray if needed)."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    _ensure_ray()
    return choose_use_gpu(cfg, cluster_facts())


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


def checkpoint_facts(checkpoint: str, num_classes: int | None) -> tuple[float | None, str | None]:
    """(training sigma, training MLflow run id) from the checkpoint's ``extra``, each None if absent.

    sigma is the shallowest ``sigma`` (or ``<section>.sigma``) key in ``extra`` and its nested dicts
    (e.g. ``extra["sigma"]`` or ``extra["config"]["loss"]["sigma"]``); the run id is
    ``extra["mlflow_run_id"]``. Reads the file only (no model is built).
    """
    record = read_checkpoint(checkpoint)
    if num_classes is not None and record["num_classes"] is not None and record["num_classes"] != num_classes:
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


def check_arrays_input(cfg: CertifyConfig) -> None:
    """For ``dataset: arrays``, read and check the arrays (dtypes, NaN / inf, labels, lengths) before Ray
    starts: ``ValueError`` naming the array and its first bad row."""
    if cfg.dataset == "arrays":
        arrays_dataset(cfg.data_dir, cfg.split, num_classes=cfg.num_classes)


def pool_plan(cfg: CertifyConfig, use_gpu: bool, facts: ClusterFacts) -> tuple[int, int]:
    """(actors to start now, actors the pool grows to as nodes arrive).

    Without an autoscaler that can add the actors' CPUs / GPUs: ``_pool_size`` (what the cluster has,
    waited for ``resource_wait_s``). With one: the target is ``num_actors``, else the most the
    autoscaler's node types allow, refused at once if above that; the autoscaler is asked for the
    target's resources (``request_resources``), and the pool starts as soon as one actor fits, waiting
    at most ``autoscale_wait_s`` for the first node (a line on stderr each minute).
    """
    key = "GPU" if use_gpu else "CPU"
    if not facts.can_add(key):
        size = _pool_size(cfg, use_gpu)
        return size, size
    most = facts.most(key)
    target = cfg.num_actors if cfg.num_actors is not None else most
    if target > most:
        raise ValueError(f"num_actors={cfg.num_actors}: the cluster's autoscaler can bring at most {most} "
                         f"{key}s and each actor needs one; use num_actors <= {most}")
    bundle = {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}
    ask_autoscaler([dict(bundle) for _ in range(target)])
    now = wait_for(key, 1, cfg.autoscale_wait_s, what="adre-ray certify (autoscaler adding nodes)")
    free = int(now.free.get(key, 0))
    if free < 1:
        ask_autoscaler([])
        raise ValueError(f"num_actors={cfg.num_actors}: no free {key} came up within autoscale_wait_s="
                         f"{cfg.autoscale_wait_s:g} s (the autoscaler was asked for {target}); see "
                         "`ray status` for failed launches, or raise autoscale_wait_s")
    return min(free, target), target


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
    return checkpoint_facts(cfg.checkpoint, declared_num_classes(cfg, read_file=False))


def declared_num_classes(cfg: CertifyConfig, read_file: bool = True) -> int | None:
    """The class count known before any model runs: ``cfg.num_classes``, else the dataset's (cifar10,
    imagenet), else (``read_file``) the checkpoint's recorded one; None = read from the model's output."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    if cfg.dataset != "arrays":
        return dataset_info(cfg.dataset).num_classes
    if read_file and cfg.model_fn is None:
        return read_checkpoint(cfg.checkpoint)["num_classes"]
    return None


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


def resolve_certify_precision(cfg: CertifyConfig) -> CertifyConfig:
    """``cfg`` with ``precision`` resolved to fp32 | bf16 for the actors' device (``amp`` folded in), so the
    manifest, every row and MLflow record the precision the counts were made in, never ``auto``.
    ``use_gpu: null`` with ``precision: auto`` asks the cluster whether it has a GPU (starting Ray)."""
    setting = cfg.precision_setting
    use_gpu = cfg.use_gpu
    if setting == "auto" and use_gpu is None:
        use_gpu = resolve_use_gpu(cfg)
    resolved = resolve_precision(setting, "cuda" if use_gpu else "cpu")
    warn_if_emulated(resolved, "cuda" if use_gpu else "cpu", "CPU actors")
    return dataclasses.replace(cfg, precision=resolved, amp=None)


def manifest_settings(cfg: CertifyConfig, use_gpu: bool = False) -> dict[str, Any]:
    """The settings that determine the rows (``MANIFEST_FIELDS``), plus the dataset location. The noise
    scheme is that of the actors' device (GPU actors draw Philox noise, CPU actors torch's)."""
    return {
        "checkpoint": model_identity(cfg), "dataset": cfg.dataset,
        "split": cfg.split, "sigma": cfg.sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
        "seed": cfg.seed, "mode": cfg.tcertify_mode, "grid": list(cfg.grid), "shard_size": cfg.shard_size,
        "data_dir": cfg.data_dir, **shortcut_settings(cfg),
        "noise_scheme": scheme_of_noise(default_noise("cuda" if use_gpu else "cpu")),
        "precision": cfg.precision,
    }


def mixed_device_settings(out_dir: Path | str, settings: dict[str, Any], allow_mixed: bool) -> dict[str, Any]:
    """``settings``, with the folder's recorded noise scheme when devices may be mixed: CPU actors (scheme
    2) may then add rows to a GPU folder (scheme 3) and back; each row records its own scheme and
    ``run.json``'s ``devices`` lists every device (``adre_ray.analysis.devices``)."""
    existing = read_manifest(out_dir) if allow_mixed else None
    if existing is None or "noise_scheme" not in existing:
        return settings
    return {**settings, "noise_scheme": existing["noise_scheme"]}


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


MLFLOW_RUN_FILE = "_mlflow_run.json"
"""In a result folder: the MLflow store and run id of the certification writing it (so a resume continues
that run instead of leaving it RUNNING and opening another). ``_``: Parquet readers skip it."""
LEGACY_MLFLOW_RUN_FILE = "mlflow_run.json"
"""Its name in folders written before (read when the new one is absent)."""


def previous_certify_run(out_dir: Path | str, tracking_uri: str | None) -> str | None:
    """The run id recorded in ``out_dir`` if it belongs to the same MLflow store and still exists there
    (not deleted); None otherwise (a new run is then opened)."""
    uri = resolve_tracking_uri(tracking_uri)
    path = side_file(out_dir, MLFLOW_RUN_FILE, LEGACY_MLFLOW_RUN_FILE)
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
    """Write ``out_dir/_mlflow_run.json`` (atomically: rename locally, one upload on object storage) naming
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


def check_certify_paths(cfg: CertifyConfig) -> None:
    """Refuse a local checkpoint when the actors may run on other nodes (``cluster.check_cluster_paths``).
    The driver alone reads ``data_dir`` and writes ``output_dir`` and the MLflow run, so those may be
    local to the driver's node."""
    if cfg.model_fn is not None:
        return
    _ensure_ray()
    check_cluster_paths({"checkpoint": cfg.checkpoint}, cluster_facts(),
                        shared_filesystem=cfg.shared_filesystem,
                        flag="shared_filesystem=true (--shared-filesystem)")


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
    completed_indices(output_location(cfg.output_dir))  # a corrupt part is named before Ray is needed
    check_certify_paths(cfg)
    cfg, train_run_id, train_sigma = _resolve_settings(cfg)
    assert cfg.sigma is not None
    out_dir = output_location(cfg.output_dir)
    num_classes = declared_num_classes(cfg)
    split_size = len(build_dataset(cfg.dataset, cfg.data_dir, cfg.split, augment=False))  # type: ignore[arg-type]
    selected = select_indices(cfg, split_size)
    if not selected:
        raise ValueError(f"start={cfg.start}: beyond the {split_size} images of the {cfg.split!r} split")
    cfg = resolve_certify_precision(cfg)  # after the data checks: may need the cluster (auto, use_gpu null)
    with output_folder_lock(out_dir):  # one run at a time per folder (released by the OS if we die)
        ensure_manifest(out_dir, mixed_device_settings(out_dir, manifest_settings(cfg, resolve_use_gpu(cfg)),
                                                       cfg.allow_mixed_devices))
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
                params = precision_params(cfg.flat_dict(), cfg.precision)  # resolved, never auto
                log_config({**params, "num_images_selected": len(selected),
                            "num_images_resumed": len(selected) - len(todo)}, tracking_uri=cfg.tracking_uri)
            progress = _certify_images_or_job_error(cfg, todo, num_classes, train_run_id, out_dir, hooks,
                                                    run_id, pool, train_sigma, len(selected) - len(todo))
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


def check_resume(cfg: CertifyConfig) -> None:
    """``ValueError`` naming the field when ``cfg.output_dir`` holds a run of other settings (as
    ``run_certification`` would raise, but without Ray and without writing anything)."""
    with warnings.catch_warnings():  # run_certification gives the sigma warning, once
        warnings.simplefilter("ignore", UserWarning)
        resolved, _, _ = _resolve_settings(cfg)
    location = output_location(resolved.output_dir)
    precision_known = resolved.precision_setting != "auto" or resolved.use_gpu is not None
    if precision_known:
        precision = resolve_precision(resolved.precision_setting, "cuda" if resolved.use_gpu else "cpu")
        resolved = dataclasses.replace(resolved, precision=precision, amp=None)
    settings = manifest_settings(resolved, bool(resolved.use_gpu))
    # what only the cluster decides (use_gpu: null) is compared once Ray is up: take the folder's value here
    undecided = {"noise_scheme"} if resolved.use_gpu is None or resolved.allow_mixed_devices else set()
    if not precision_known:
        undecided.add("precision")
    existing = read_manifest(location) or {}
    settings.update({key: existing[key] for key in undecided if key in existing})
    check_manifest_settings(location, settings)


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


def _certify_images(cfg: CertifyConfig, todo: list[int], num_classes: int | None, train_run_id: str | None,
                    out_dir: Path | str, hooks: CertifyHooks, run_id: str | None,
                    given_pool: CertifyPool | None, train_sigma: float | None = None,
                    done_before: int = 0) -> _Progress:
    """The scheduling loop (steps 2-5 of the module docstring). Finished rows are written even when the
    loop stops on an exception (a hook's, a KeyboardInterrupt), so a re-run only redoes unfinished images.
    MLflow's ``images_done`` counts the ``done_before`` images of earlier runs too, so a resumed run's
    steps continue where the interrupted run stopped (never a step logged twice)."""
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
    if num_classes is None:  # read from the model's output on the first image (every actor checks it too)
        first, _ = load_images(cfg.dataset, cfg.data_dir, cfg.split, todo[:1])
        probe = pool.actors[pool.live()[0]].output_classes.remote(first[0])
        num_classes = int(ray.get(probe, timeout=cfg.stall_timeout_s))
    num_actors = cfg.num_actors or max(len(pool), pool.target)  # the pool may grow to this many
    facts = pool.device_facts(min(len(pool), num_actors), timeout_s=cfg.stall_timeout_s)
    record_devices(out_dir, facts, allow_mixed=cfg.allow_mixed_devices)
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
            images_done = done_before + progress.done
            log_metrics({"images_done": images_done, "samples_per_s": progress.samples_per_s()},
                        step=images_done, tracking_uri=cfg.tracking_uri)
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
            if not 0 <= label < num_classes:
                raise ValueError(f"data_dir={cfg.data_dir!r}: label {label} of row {idx} is outside the "
                                 f"model's {num_classes} classes [0, {num_classes})")
            plan = shard_plan(idx, cfg.n0, 0 if shortcuts else cfg.n, cfg.shard_size)
            images[idx] = _Image(idx, label, ray.put(pixels), len(plan), np.zeros(num_classes, np.int64),
                                 np.zeros(num_classes, np.int64), n=cfg.n, main_started=not shortcuts)
            queue.extend(plan)

    def dispatch() -> None:
        pool.grow(num_actors)
        slots = pool.live(num_actors)
        while queue and slots:
            slot = min(slots, key=lambda s: pool.load[s])
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
                         noise_scheme=facts[0]["noise_scheme"],
                         precision=cfg.precision, **_sequential_row_fields(cfg, image))
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
        stall = _StallWatch(cfg.stall_timeout_s)
        starved = _Starved(cfg)
        while running or queue:
            if not running:  # every actor's node is gone: wait for one to come back, within a deadline
                starved.check(pool)
                time.sleep(0.5)
                dispatch()
                stall.restart()  # the wait for a node has its own deadline
                continue
            starved.since = None
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            stall.check(bool(ready), running=len(running), actors=num_actors)
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


STALL_MESSAGE_S = 60.0
"""While no shard finishes, a line on stderr this often."""


class _StallWatch:
    """The certification loop's deadline: a line on stderr every ``STALL_MESSAGE_S`` without a finished
    shard, and ``ValueError`` (exit 2; finished images are written on the way out, a re-run resumes) after
    ``timeout_s`` without one, so the job never waits without a word, e.g. for actors on a lost node."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last_shard = self.last_word = time.monotonic()

    def restart(self) -> None:
        """Count from now (after a wait that has its own deadline)."""
        self.last_shard = self.last_word = time.monotonic()

    def check(self, progressed: bool, *, running: int, actors: int) -> None:
        now = time.monotonic()
        if progressed:
            self.last_shard = self.last_word = now
            return
        waited = now - self.last_shard
        if waited >= self.timeout_s:
            raise ValueError(f"stall_timeout_s={self.timeout_s:g}: no shard finished for {waited:.0f} s "
                             f"({running} shard(s) running on {actors} actor(s): actors lost or not "
                             "schedulable, e.g. a node gone); finished images are kept, re-run the same "
                             "command to resume")
        if now - self.last_word >= STALL_MESSAGE_S:
            self.last_word = now
            print(f"adre-ray certify: no shard finished for {waited:.0f} s ({running} running on {actors} "
                  f"actor(s)); giving up after stall_timeout_s={self.timeout_s:g} s", file=sys.stderr,
                  flush=True)


class _Starved:
    """The deadline of a run left with no live actor (their nodes removed): ``autoscale_wait_s`` when an
    autoscaler can bring a node, else ``resource_wait_s``; then a clear error instead of a hang."""

    def __init__(self, cfg: CertifyConfig) -> None:
        self.cfg = cfg
        self.since: float | None = None

    def check(self, pool: CertifyPool) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self.said_at = now, -math.inf
            self.autoscaled = cluster_facts().can_add(pool.resource)
            self.wait_s = self.cfg.autoscale_wait_s if self.autoscaled else self.cfg.resource_wait_s
        waited = now - self.since
        if waited >= self.wait_s:
            name = "autoscale_wait_s" if self.autoscaled else "resource_wait_s"
            raise RuntimeError(f"every certification actor was lost with its node and no free "
                               f"{pool.resource} came back within {name}={self.wait_s:g} s; the finished "
                               "images are written: add nodes and re-run the same command to resume")
        if now - self.said_at >= PROGRESS_EVERY_S:
            print(f"adre-ray certify: no certification actor is alive (their nodes are gone); waiting up to "
                  f"{self.wait_s:g} s for a free {pool.resource} ({waited:.0f} s so far)", file=sys.stderr,
                  flush=True)
            self.said_at = now


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

FLAG_NAMES = CERTIFY_FLAG_NAMES
build_parser = certify_parser


def config_from_args(argv: Sequence[str]) -> CertifyConfig:
    """YAML file, then ``--set`` overrides, then the field flags (the last word wins).

    Flag values are text parsed by the field's type (``1e-5``, ``100_000``, ``null``, ``0.5,1.0``), never
    as YAML, so a path is never re-interpreted.
    """
    return load_from_args(CertifyConfig, build_parser().parse_args(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """``adre-ray certify``: exit 0 on success, 2 on a configuration, data or output error (message on
    stderr), 130 on Ctrl-C (one line; re-running the same command resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    started = False
    try:
        args = build_parser().parse_args(argv)  # parsed once: the config and --address
        cfg = load_from_args(CertifyConfig, args)
        check_output_dir(cfg.output_dir)  # a file in the way, a read-only folder: before Ray starts
        check_arrays_input(cfg)  # bad arrays: refused before the lock makes the output folder
        check_resume(cfg)  # a bad checkpoint or a folder of other settings: refused before anything is made
        with output_folder_lock(output_location(cfg.output_dir)):  # held on (re-entered) by the run
            started = connect_ray(args.address)
            result = run_certification(cfg)
    except ValueError as err:
        print(f"adre-ray certify: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up while writing a part (finished parts are kept)
        print(f"adre-ray certify: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # finished images were written on the way out
        return interrupted("certify", stop)
    finally:
        if started:
            ray.shutdown()
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
