"""The certification scheduler: an image moves pilot -> main waves -> row, its shards spread over actors.

Each image's draws are cut into shards (``shard_plan``); shard (idx, stream, s) is sampled with noise
seeded by (seed, idx, stream, s), so the summed counts, and hence every row, are the same whatever the
number of actors, the order, the grouping or a re-run. ``Scheduler.run`` keeps ``TASKS_PER_ACTOR`` calls
queued per actor, each carrying up to ``SHARDS_PER_CALL`` shards (the driver's cost is per call), admits
new images as earlier ones drain, and asks the shortcut rules (adre_ray.smoothing.shortcuts)
what an image does next each time its queued shards are all summed. Collaborators: the actors
(``CertifyPool``), the rows' destination (``RowSink``: Parquet parts and MLflow), the run's hooks.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from adre_ray.config.certify import CertifyConfig
from adre_ray.data import load_images
from adre_ray.distributed.certify_pool import CertifyPool, ShardTask
from adre_ray.distributed.cluster import PROGRESS_EVERY_S, cluster_facts
from adre_ray.smoothing import MAIN_STREAM, PILOT_STREAM
from adre_ray.smoothing.shortcuts import ImageDraws, Shortcut, next_look

if TYPE_CHECKING:
    from pathlib import Path

TASKS_PER_ACTOR = 2
"""Calls queued per actor: one running, one ready, so an actor never waits for the driver."""

SHARDS_PER_CALL = 16
"""Most shards one Ray call carries. The driver's cost is mostly per call (a submission, a result to
fetch), so grouping keeps it to ~1 call per image at the default ``shard_size`` (benchmarks/RESULTS.md,
section 4)."""

CALLS_AHEAD = 4
"""Once every image is admitted (a small run, a run's tail), a call carries at most 1 / ``CALLS_AHEAD`` of
the queue's shards per live actor: the last shards spread over several calls per actor, so the tail
balances and a lost actor loses little. The queue is kept at ``CALLS_AHEAD`` full calls per actor."""

INLINE_IMAGE_BYTES = 64 * 1024
"""Images up to this size (CIFAR: 12 KB) travel inside each call that needs them, larger ones (ImageNet:
600 KB) once through the object store (``ray.put``: ~1-2 ms of driver CPU per image)."""

IMAGES_IN_FLIGHT_MAX = 1024
"""Cap on the images admitted at once when ``images_in_flight`` is null (their pixels sit in the object
store: ~600 MB at ImageNet size)."""

LOAD_CHUNK = 64
"""Images decoded per ``load_images`` call (memory stays bounded on ImageNet)."""


@dataclass
class CertifyHooks:
    """Test / monitoring hooks, called on the driver. An exception raised in a hook stops the run after
    the finished images are written (the run then resumes cleanly).

    on_shard_done(pool, task)  after a shard's counts were summed
    on_part_written(path)      after each Parquet part is in place
    """

    on_shard_done: Callable[[CertifyPool, ShardTask], None] | None = None
    on_part_written: Callable[[Path | str], None] | None = None


def shard_plan(idx: int, n0: int, n: int, shard_size: int) -> list[ShardTask]:
    """The shards of one image: ceil(n0 / shard_size) pilot ones, then ceil(n / shard_size) main ones.

    Every shard holds ``shard_size`` draws except the last of each stream (the remainder).
    """
    tasks = []
    for stream, total in ((PILOT_STREAM, n0), (MAIN_STREAM, n)):
        for shard, begin in enumerate(range(0, total, shard_size)):
            tasks.append(ShardTask(idx, stream, shard, min(shard_size, total - begin)))
    return tasks


@dataclass
class ImageInFlight(ImageDraws):
    """An admitted image: its counts (``ImageDraws``), its pixels as calls carry them (``shippable``),
    its shards."""

    idx: int = 0
    ref: Any = None
    remaining: int = 0  # queued or running shards not yet summed
    time_s: float = 0.0  # actor seconds spent on its shards
    main_todo: list[ShardTask] | None = None  # main shards not yet queued; None = not yet planned

    def add(self, task: ShardTask, counts: Any, seconds: float) -> None:
        """Sum one finished shard into the pilot or the main counts."""
        target = self.pilot if task.stream == PILOT_STREAM else self.counts
        target += np.asarray(counts, dtype=np.int64)
        self.time_s += float(seconds)
        self.remaining -= 1
        if task.stream == MAIN_STREAM:
            self.made += task.num


def next_wave(image: ImageInFlight, rules: Sequence[Shortcut], shard_size: int) -> list[ShardTask]:
    """The main shards to queue once every queued shard of ``image`` was summed ([] = the image is done):
    those up to the main-draw count the rules look at next (``shortcuts.next_look``). The shards are
    those of the full run (same noise), so a shortcut only decides which of them are made."""
    upto = next_look(rules, image)
    if upto is None:
        image.main_todo = []
        return []
    if image.main_todo is None:
        image.main_todo = shard_plan(image.idx, 0, image.n, shard_size)
    count = -(-(upto - image.made) // shard_size)
    wave, image.main_todo = image.main_todo[:count], image.main_todo[count:]
    return wave


class RowSink(Protocol):
    """Where finished rows go (the driver's Parquet parts and MLflow metrics)."""

    def add(self, row: dict[str, Any]) -> None: ...
    def flush_if_due(self) -> None: ...
    def flush(self) -> None: ...


@dataclass
class Progress:
    """Images finished and draws made by this run (the progress bar shows them as they come)."""

    bar: Any = None
    done: int = 0
    abstain_certify: int = 0
    abstain_tcertify: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def samples_per_s(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.samples / elapsed if elapsed > 0 else 0.0

    def record(self, row: dict[str, Any]) -> None:
        """Count a finished image's row."""
        self.done += 1
        self.abstain_certify += row["certify_predict"] < 0
        self.abstain_tcertify += row["tcertify_predict"] < 0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(abstain=self.abstain_certify, abstain_t=self.abstain_tcertify,
                                 samples_s=f"{self.samples_per_s():.0f}", refresh=False)


def progress_bar(cfg: CertifyConfig, images: int) -> Progress:
    """A ``Progress`` with a tqdm bar over ``images`` (hidden when ``cfg.progress`` is false)."""
    return Progress(tqdm(total=images, unit="img", desc="certify", disable=not cfg.progress,
                         dynamic_ncols=True))


def in_flight_limit(cfg: CertifyConfig, num_actors: int, pilot_first: bool) -> int:
    """Images admitted at once: ``images_in_flight``, or enough to fill ``TASKS_PER_ACTOR`` full calls per
    actor plus ``CALLS_AHEAD`` queued ones (at most ``IMAGES_IN_FLIGHT_MAX``); an image that offers one
    stage at a time (pilot, then wave by wave) counts for fewer shards."""
    if cfg.images_in_flight:
        return cfg.images_in_flight
    shards_per_image = cfg.num_shards(cfg.n0) + cfg.num_shards(cfg.n)
    if pilot_first:
        shards_per_image = max(1, min(cfg.num_shards(cfg.n0),
                                      cfg.early_abstain_wave if cfg.early_abstain else cfg.num_shards(cfg.n)))
    shards = (TASKS_PER_ACTOR + CALLS_AHEAD) * SHARDS_PER_CALL * num_actors
    images = (2 if pilot_first else 1) * math.ceil(shards / shards_per_image) + 1
    return min(IMAGES_IN_FLIGHT_MAX, max(2, images))


class Scheduler:
    """Certifies images on a pool's actors: ``run`` is the algorithm, the other methods its steps.

    ``rules``: the shortcuts (empty = each image's pilot and main shards are queued at once; else the
    pilot first, then the waves the rules release). ``make_row``: a finished image -> its row; ``sink``:
    where rows go; ``progress``: counts of this run.
    """

    def __init__(self, cfg: CertifyConfig, pool: CertifyPool, rules: Sequence[Shortcut], *, num_actors: int,
                 num_classes: int, make_row: Callable[[ImageInFlight], dict[str, Any]], sink: RowSink,
                 hooks: CertifyHooks, progress: Progress) -> None:
        self.cfg, self.pool, self.rules, self.hooks = cfg, pool, list(rules), hooks
        self.num_actors, self.num_classes = num_actors, num_classes
        self.make_row, self.sink, self.progress = make_row, sink, progress
        self.pilot_first = bool(self.rules)
        self.in_flight_limit = in_flight_limit(cfg, num_actors, self.pilot_first)
        self.waiting: collections.deque[int] = collections.deque()  # images not yet admitted
        self.loaded: collections.deque[tuple[int, Any, int]] = collections.deque()  # decoded, not admitted
        self.images: dict[int, ImageInFlight] = {}
        self.queue: collections.deque[ShardTask] = collections.deque()
        self.running: dict[Any, tuple[list[ShardTask], int, int]] = {}  # call -> (tasks, slot, generation)

    def run(self, todo: Sequence[int]) -> None:
        """Certify ``todo``: admit images, keep the actors busy, sum each finished shard into its image and
        move a drained image on (next wave or row), until every image has its row."""
        self.waiting.extend(todo)
        self.admit()
        self.dispatch()
        stall = _StallWatch(self.cfg.stall_timeout_s)
        starved = _Starved(self.cfg)
        while self.running or self.queue:
            if not self.running:  # every actor's node is gone: wait for one to come back, within a deadline
                starved.check(self.pool)
                time.sleep(0.5)
                self.dispatch()
                stall.restart()  # the wait for a node has its own deadline
                continue
            starved.since = None
            ready = finished_calls(list(self.running))
            stall.check(bool(ready), running=len(self.running), actors=self.num_actors)
            for ref in ready:
                self.collect(ref)
            self.sink.flush_if_due()
            self.admit()
            self.dispatch()

    def admit(self) -> None:
        """Admit waiting images (pixels into the object store, first shards queued) while fewer than the
        in-flight limit are admitted and the queue holds less than ``CALLS_AHEAD`` full calls per actor."""
        cfg = self.cfg
        queue_full = CALLS_AHEAD * SHARDS_PER_CALL * self.num_actors
        while self.waiting or self.loaded:
            if len(self.images) >= self.in_flight_limit or len(self.queue) >= queue_full:
                return
            if not self.loaded:
                chunk = [self.waiting.popleft() for _ in range(min(LOAD_CHUNK, len(self.waiting)))]
                pixels, labels = load_images(cfg.dataset, cfg.data_dir, cfg.split, chunk)
                self.loaded.extend((i, pixels[k].clone(), int(labels[k])) for k, i in enumerate(chunk))
            idx, image_pixels, label = self.loaded.popleft()
            if not 0 <= label < self.num_classes:
                raise ValueError(f"data_dir={cfg.data_dir!r}: label {label} of row {idx} is outside the "
                                 f"model's {self.num_classes} classes [0, {self.num_classes})")
            plan = shard_plan(idx, cfg.n0, 0 if self.pilot_first else cfg.n, cfg.shard_size)
            ref = shippable(image_pixels.numpy())
            self.images[idx] = ImageInFlight(
                label, np.zeros(self.num_classes, np.int64), np.zeros(self.num_classes, np.int64), n=cfg.n,
                planned=not self.pilot_first, idx=idx, ref=ref, remaining=len(plan),
                main_todo=None if self.pilot_first else [])
            self.queue.extend(plan)

    def dispatch(self) -> None:
        """Hand queued shards to the least-loaded live actors, up to ``TASKS_PER_ACTOR`` calls each; a call
        carries the queue's next ``SHARDS_PER_CALL`` shards, or once every image is admitted (a small run,
        the tail), 1 / ``CALLS_AHEAD`` of the queue per live actor if less."""
        self.pool.grow(self.num_actors)
        slots = self.pool.live(self.num_actors)
        free = sum(TASKS_PER_ACTOR - self.pool.load[s] for s in slots)
        while self.queue and free > 0:
            slot = min(slots, key=lambda s: self.pool.load[s])
            share = SHARDS_PER_CALL if self.waiting or self.loaded else (  # more images to come: full calls
                -(-len(self.queue) // (CALLS_AHEAD * len(slots))))
            size = min(SHARDS_PER_CALL, share, len(self.queue))
            tasks = [self.queue.popleft() for _ in range(size)]
            ref = self.pool.submit(slot, tasks, {t.idx: self.images[t.idx].ref for t in tasks})
            self.running[ref] = (tasks, slot, self.pool.generation[slot])
            free -= 1

    def collect(self, ref: Any) -> None:
        """Sum a finished call's shards into their images (a lost actor's shards are re-queued, in order,
        the actor replaced)."""
        tasks, slot, generation = self.running.pop(ref)
        self.pool.load[slot] -= 1
        try:
            counts, seconds = ray.get(ref)
        except RayActorError as err:
            self.pool.replace(slot, generation, err)
            self.queue.extendleft(reversed(tasks))
            return
        for task, task_counts, task_seconds in zip(tasks, counts, seconds, strict=True):
            image = self.images[task.idx]
            image.add(task, task_counts, task_seconds)
            self.progress.samples += task.num
            if image.remaining == 0:
                self.advance(image)
            if self.hooks.on_shard_done is not None:
                self.hooks.on_shard_done(self.pool, task)

    def advance(self, image: ImageInFlight) -> None:
        """pilot -> main waves -> row: queue the image's next wave ahead of other images' shards (started
        images finish first), or, when the rules say it is done, hand its row to the sink."""
        wave = next_wave(image, self.rules, self.cfg.shard_size)
        if wave:
            image.remaining = len(wave)
            self.queue.extendleft(reversed(wave))
            return
        row = self.make_row(image)
        self.sink.add(row)
        del self.images[image.idx]
        self.progress.record(row)

    def cancel(self) -> None:
        """Drop this run's leftover tasks (a shared pool lives on)."""
        for ref in self.running:
            ray.cancel(ref)
        self.pool.load = [0] * len(self.pool)


def shippable(pixels: np.ndarray) -> Any:
    """What a call carries for an image: the array itself when small (``INLINE_IMAGE_BYTES``), else its
    reference in the object store. Numpy, not torch: zero-copy for the actors, no torch to unpickle."""
    return pixels if pixels.nbytes <= INLINE_IMAGE_BYTES else ray.put(pixels)


def finished_calls(refs: list[Any], timeout_s: float = 1.0) -> list[Any]:
    """The calls among ``refs`` that are done: waits up to ``timeout_s`` for the first, then takes every
    other one already done (one loop of the driver handles them all)."""
    ready, rest = ray.wait(refs, num_returns=1, timeout=timeout_s)
    if ready and rest:
        ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
    return ready


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
