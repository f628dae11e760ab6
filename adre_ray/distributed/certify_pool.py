"""The certification actors' pool and its cluster: how many actors, on which devices, replaced when lost.

``CertifyPool`` holds one model per actor slot; ``make_pool`` sizes it from the cluster (``pool_plan``:
free CPUs / GPUs, or an autoscaler's target) and ``check_certify_paths`` refuses a local checkpoint that
actors on other nodes could not read.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError

from adre_ray import storage
from adre_ray.config.certify import CertifyConfig
from adre_ray.distributed._common import connect_ray
from adre_ray.distributed.actors import CertifyActor
from adre_ray.distributed.certify_settings import ModelFacts, declared_num_classes, resolve_settings
from adre_ray.distributed.cluster import (
    ClusterFacts,
    ask_autoscaler,
    check_cluster_paths,
    cluster_facts,
    wait_for,
)
from adre_ray.models.model_fn import import_paths, model_fn_identity
from adre_ray.precision import resolve_precision, warn_if_emulated


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One unit of work: ``num`` draws of ``stream`` (pilot or main) for image ``idx``, shard ``shard``."""

    idx: int
    stream: int
    shard: int
    num: int


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

    def submit(self, slot: int, tasks: Sequence[ShardTask], image_refs: dict[int, Any]) -> Any:
        """One Ray call counting ``tasks`` (shards of any images) on slot ``slot``'s actor; ``image_refs``:
        idx -> pixels (an array, or its reference in the object store), in the order the tasks' idx first
        appear. Its result is ``CertifyWorker.count_shards``'s."""
        self.load[slot] += 1
        return self.actors[slot].count_shards.remote([(t.idx, t.stream, t.shard, t.num) for t in tasks],
                                                     *image_refs.values())

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


def make_pool(cfg: CertifyConfig, model: ModelFacts | None = None) -> CertifyPool:
    """A pool for ``cfg`` (sigma resolved): ``num_actors`` actors, or one per GPU / CPU of the cluster;
    on an autoscaling cluster, asks for the actors' resources and grows as nodes arrive. ``model``: the
    checkpoint's facts when read already."""
    _ensure_ray()
    if cfg.sigma is None:
        cfg, _ = resolve_settings(cfg, model)
    facts = cluster_facts()
    use_gpu = choose_use_gpu(cfg, facts)
    now, target = pool_plan(cfg, use_gpu, facts)
    pool = CertifyPool(cfg.checkpoint, num_actors=now, target=target,
                       num_classes=declared_num_classes(cfg, facts=model), use_gpu=use_gpu,
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


def _ensure_ray() -> None:
    if not ray.is_initialized():
        connect_ray()


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
