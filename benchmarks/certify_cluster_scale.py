"""Scale simulation: can one certification driver keep 8, 32, 64 GPU actors busy?

    .venv/bin/python benchmarks/certify_cluster_scale.py [--actors 8,32,64] [--rates 0.5,3,0.05,0.3]
        [--shard-size 10000] [--seconds 20] [--profile]

The real scheduler (``run_certification``: dispatch, result handling, bounds, Parquet writes) drives stub
actors with the real actor's interface (``configure``, ``device_facts``, ``count_shards``) that import no
torch: a shard of ``num`` draws sleeps ``num * s_per_image / (n0 + n)`` seconds and returns fixed
counts, so the "model" costs a stated time per sample. The stubs are Ray actors on logical CPUs
(``ray.init(num_cpus=actors)``) of a private local cluster; the pool is started and warmed before the
timed run. Real CIFAR-10 images are loaded and shipped.

Figures per run:

- utilization: the stubs' busy seconds / (actors x wall time of the whole run: start, steady state and
  the tail where the last calls drain);
- steady utilization: the same within the window where every actor had started and none had finished
  its last shard (the stubs log each shard's wall-clock begin and end); 1.0 = no actor ever waited;
- the driver's CPU per shard, per Ray call and per image: ``time.thread_time`` of its Python thread
  (scheduling, bounds, Parquet writes, Ray's Python-side submission), the part that cannot use the head's
  other cores; the utilization one driver thread sustains follows: min(1, 1 / (CPU per image x images
  per second the actors finish when never idle)).

On a machine with fewer cores than actors, Ray still runs a process per stub, so the measured
utilization also measures the machine; the driver's CPU figures are the ones that carry to a real head.

Rates (seconds per image at n = 100,000, per GPU): 0.5 (CIFAR ResNet-110) and 3 (ImageNet ResNet-50), and
10x faster: 0.05 and 0.3. Images per run are sized so each actor gets about ``--seconds`` of work (at
most the 10,000 test images). Results go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from adre_ray.analysis.results import read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.distributed import certify_scheduler
from adre_ray.distributed.certify import CertifyPool, run_certification

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
N0, N = 100, 100_000
SPLIT_SIZE = 10_000
"""CIFAR-10 test images (the driver loads and ships real images)."""


@ray.remote(num_cpus=1)
class StubCertifyActor:
    """``CertifyWorker``'s interface; counting ``num`` draws costs ``num * s_per_sample`` seconds."""

    def __init__(self, *, num_classes: int, s_per_sample: float, **_: Any) -> None:
        self.num_classes = num_classes
        self.s_per_sample = s_per_sample
        self.log: list[tuple[float, float]] = []
        self.calls: list[tuple[float, float]] = []

    def configure(self, *, sigma: float, seed: int, batch_size: int) -> None:
        return None

    def device_facts(self) -> dict[str, Any]:
        return {"type": "stub", "model": "sleep", "noise": "torch", "noise_scheme": 2}

    def count_shards(self, shards: list[tuple[int, int, int, int]],
                     *images: Any) -> tuple[np.ndarray, list[float]]:
        counts = np.zeros((len(shards), self.num_classes), np.int64)
        seconds = []
        for row, (idx, _stream, _shard, num) in enumerate(shards):
            began, wall = time.perf_counter(), time.time()
            time.sleep(num * self.s_per_sample)
            counts[row, idx % self.num_classes] = num - num // 10  # certifies; another class has the rest
            counts[row, (idx + 1) % self.num_classes] = num // 10
            seconds.append(time.perf_counter() - began)
            self.log.append((wall, wall + seconds[-1]))
        self.calls.append((self.log[-len(shards)][0], self.log[-1][1], tuple(shards[0][:3])))
        return counts, seconds

    def busy_log(self) -> tuple[list[tuple[float, float]], list[tuple[float, float, tuple]]]:
        """(begin, end) wall-clock times of the shards, and (begin, end, first shard's key) of the calls,
        counted since the last call."""
        log, self.log, calls, self.calls = self.log, [], self.calls, []
        return log, calls


class StubPool(CertifyPool):
    """The real pool (slots, replacement, growth) with stub actors."""

    def __init__(self, checkpoint: str, *, s_per_sample: float, **kwargs: Any) -> None:
        self.s_per_sample = s_per_sample
        self.calls = 0
        self.submitted: dict[tuple[int, int, int], float] = {}  # first shard's key -> wall-clock submit
        super().__init__(checkpoint, **kwargs)

    def submit(self, slot: int, tasks: Any, image_refs: dict[int, Any]) -> Any:
        self.calls += 1
        self.submitted[(tasks[0].idx, tasks[0].stream, tasks[0].shard)] = time.time()
        return super().submit(slot, tasks, image_refs)

    def _new_actor(self) -> Any:
        actor = StubCertifyActor.remote(num_classes=self.num_classes, s_per_sample=self.s_per_sample)
        self._facts[actor] = actor.device_facts.remote()
        return actor


@contextlib.contextmanager
def profiled(enabled: bool) -> Any:
    """cProfile the driver (``--profile``): its top functions by own time on stderr."""
    if not enabled:
        yield
        return
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)


def steady_window(logs: list[list[tuple[float, float]]]) -> tuple[float, float]:
    """(begin, end) of the window where every actor had begun and none had ended its last shard."""
    return max(min(b for b, _ in log) for log in logs), min(max(e for _, e in log) for log in logs)


def steady_utilization(logs: list[list[tuple[float, float]]], begin: float, end: float) -> float:
    """Busy time inside the window [begin, end] / (actors x window); NaN for an empty window."""
    if end <= begin:
        return float("nan")
    busy = sum(max(0.0, min(e, end) - max(b, begin)) for log in logs for b, e in log)
    return busy / (len(logs) * (end - begin))


def call_gaps(calls: list[list[tuple[float, float, tuple]]], submitted: dict[tuple, float], begin: float,
              end: float) -> tuple[float, float]:
    """(mean gap, driver's share) within [begin, end]: the seconds an actor waited between the end of a
    call and the start of its next one, and the part of them before the driver had submitted that next
    call (the rest is the actor's own switch from one queued call to the next)."""
    gaps, late = [], []
    for log in calls:
        for (_, e1, _), (b2, _, key) in zip(log, log[1:], strict=False):
            if begin <= e1 and b2 <= end:
                gaps.append(b2 - e1)
                late.append(min(b2 - e1, max(0.0, submitted.get(key, e1) - e1)))
    if not gaps:
        return float("nan"), float("nan")
    return float(np.mean(gaps)), float(np.sum(late) / max(np.sum(gaps), 1e-12))


def run_one(actors: int, s_per_image: float, args: argparse.Namespace, root: Path, checkpoint: str) -> dict:
    s_per_sample = s_per_image / (N0 + N)
    images = min(SPLIT_SIZE, max(2 * actors, int(args.seconds * actors / s_per_image)))
    cfg = CertifyConfig(checkpoint=checkpoint, data_dir=str(args.data_dir), sigma=0.25, n0=N0, n=N, skip=1,
                        max_images=images, shard_size=args.shard_size, tracking_uri="none", progress=False,
                        output_dir=str(root / f"a{actors}_r{s_per_image}"))
    pool = StubPool(checkpoint, s_per_sample=s_per_sample, num_actors=actors, num_classes=10, use_gpu=False,
                    sigma=0.25)
    try:
        ray.get([a.configure.remote(sigma=0.25, seed=0, batch_size=1) for a in pool.actors])  # all started
        began, cpu_began, thread_began = time.perf_counter(), time.process_time(), time.thread_time()
        with contextlib.redirect_stdout(io.StringIO()), profiled(args.profile):
            result = run_certification(cfg, pool=pool)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
        thread = time.thread_time() - thread_began
        logs, calls = zip(*ray.get([a.busy_log.remote() for a in pool.actors]), strict=True)
        begin, end = steady_window(list(logs))
        steady, window = steady_utilization(list(logs), begin, end), max(0.0, end - begin)
        gap, driver_share = call_gaps(list(calls), pool.submitted, begin, end)
    finally:
        pool.shutdown()
    busy = float(np.sum(read_results(result.output_dir).column("time_s")))  # the stubs' own clocks
    shards_per_image = -(-N0 // args.shard_size) + -(-N // args.shard_size)
    done = result.images_certified
    shards = done * shards_per_image
    demand = actors / s_per_image  # images/s the actors finish when never idle
    return {"actors": actors, "s_per_image": s_per_image, "images": done, "shards": shards,
            "calls": pool.calls, "wall_s": wall, "utilization": busy / (actors * wall), "steady": steady,
            "window_s": window, "cpu_per_shard_ms": 1e3 * thread / shards,
            "cpu_per_call_ms": 1e3 * thread / pool.calls, "cpu_per_image_ms": 1e3 * thread / done,
            "process_cpu_per_image_ms": 1e3 * cpu / done, "demand": demand, "call_gap_ms": 1e3 * gap,
            "driver_share": driver_share,
            "sustainable": min(1.0, done / (thread * demand))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", default="8,32,64", help="pool sizes (default: 8,32,64)")
    parser.add_argument("--rates", default="0.5,3,0.05,0.3",
                        help="seconds per image at n = 100,000 per actor (default: 0.5,3,0.05,0.3)")
    parser.add_argument("--shard-size", type=int, default=CertifyConfig.shard_size,
                        help=f"draws per shard (default: {CertifyConfig.shard_size})")
    parser.add_argument("--seconds", type=float, default=20.0, help="work per actor per run (default: 20)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help=f"CIFAR-10 Parquet (default: {DEFAULT_DATA})")
    parser.add_argument("--profile", action="store_true", help="cProfile the driver of each run")
    parser.add_argument("--shards-per-call", type=int, default=certify_scheduler.SHARDS_PER_CALL,
                        help="shards per Ray call (default: the scheduler's SHARDS_PER_CALL)")
    args = parser.parse_args(argv)
    certify_scheduler.SHARDS_PER_CALL = args.shards_per_call
    sizes = [int(a) for a in args.actors.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    ray.init(address="local", num_cpus=max(sizes), include_dashboard=False, log_to_driver=False,
             _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            from adre_ray.models import build_model, save_model_checkpoint  # the run reads the file's facts

            checkpoint = str(save_model_checkpoint(root / "m.pt", build_model("small_cnn", 10, "cifar10"),
                                                   model_name="small_cnn", num_classes=10, dataset="cifar10",
                                                   extra={"sigma": 0.25}))
            for actors in sizes:
                for rate in rates:
                    row = run_one(actors, rate, args, root, checkpoint)
                    rows.append(row)
                    print(f"actors={actors:>3} s/image={rate:<5g} images={row['images']:>5} calls="
                          f"{row['calls']:>5} wall={row['wall_s']:.1f}s utilization={row['utilization']:.3f} "
                          f"steady={row['steady']:.3f} ({row['window_s']:.1f}s) driver thread CPU "
                          f"{row['cpu_per_shard_ms']:.3f} ms/shard {row['cpu_per_call_ms']:.2f} ms/call "
                          f"{row['cpu_per_image_ms']:.2f} ms/image (process "
                          f"{row['process_cpu_per_image_ms']:.2f} ms/image), mean gap between an actor's "
                          f"calls {row['call_gap_ms']:.1f} ms ({row['driver_share']:.0%} of it before the "
                          f"driver had sent the next call)", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    print(f"\nshard_size={args.shard_size}, n0={N0}, n={N}\n")
    print("| actors | s / image / GPU | images | Ray calls | utilization (whole run) | steady utilization "
          "(window) | driver thread CPU ms / shard, / call, / image | images/s needed | utilization one "
          "driver thread sustains | mean gap between an actor's calls (ms) | part of the gap before the "
          "driver had sent the next call |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['actors']} | {row['s_per_image']:g} | {row['images']} | {row['calls']} | "
              f"{row['utilization']:.3f} | {row['steady']:.3f} ({row['window_s']:.0f} s) | "
              f"{row['cpu_per_shard_ms']:.3f}, {row['cpu_per_call_ms']:.2f}, {row['cpu_per_image_ms']:.2f} | "
              f"{row['demand']:.0f} | {row['sustainable']:.3f} | {row['call_gap_ms']:.1f} | "
              f"{row['driver_share']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
