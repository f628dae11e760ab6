"""Certification throughput with 1 and 2 CPU actors (goal: >= 1.7x on 2 free cores).

    .venv/bin/python benchmarks/certify_scaling.py [--n 10000] [--images 4] [--models small_cnn ...]

For each model: a randomly initialised checkpoint, one warm pool of 2 actors (start-up is not timed),
then the same images certified with 1 actor and with 2 actors; samples/s = (n0 + n) * images / wall time
of the run. The reference is a plain single-thread ``sample_counts`` loop over the same shards in this
process (what one actor does, without Ray). Also checks that the 1- and 2-actor rows are identical.
Run it when ``uptime`` shows the machine idle: the ratio measures free cores, not the code, otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from adre_ray.analysis.results import read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.data import load_images
from adre_ray.distributed.certify import make_pool, run_certification, shard_plan
from adre_ray.models import build_model, save_model_checkpoint
from adre_ray.smoothing import sample_counts

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"


def reference_samples_per_s(model: torch.nn.Module, cfg: CertifyConfig, indices: list[int]) -> float:
    """The same shards sampled by a plain loop in this process with one torch thread."""
    torch.set_num_threads(1)
    images, _ = load_images(cfg.dataset, cfg.data_dir, cfg.split, indices)
    began, total = time.perf_counter(), 0
    for k, idx in enumerate(indices):
        for task in shard_plan(idx, cfg.n0, cfg.n, cfg.shard_size):
            sample_counts(model, images[k], task.num, 10, 0.25, batch_size=cfg.batch_size, seed=cfg.seed,
                          idx=idx, shard=task.shard, stream=task.stream)
            total += task.num
    return total / (time.perf_counter() - began)


def bench_model(name: str, args: argparse.Namespace, root: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(name, 10, "cifar10").eval()
    ckpt = save_model_checkpoint(root / f"{name}.pt", model, model_name=name, num_classes=10,
                                 dataset="cifar10", extra={"sigma": 0.25})
    base = dict(checkpoint=str(ckpt), data_dir=str(args.data_dir), n0=100, n=args.n, skip=1000,
                max_images=args.images, shard_size=args.shard_size, batch_size=args.batch_size,
                tracking_uri="none", progress=False)
    pool = make_pool(CertifyConfig(**base, num_actors=2, output_dir=str(root / "unused")))
    try:
        warm = CertifyConfig(**{**base, "n": 1000, "max_images": 2}, num_actors=2,
                             output_dir=str(root / f"{name}-warm"))
        with contextlib.redirect_stdout(io.StringIO()):
            run_certification(warm, pool=pool)  # actors up, model loaded, first forward passes done
        rates, tables = {}, {}
        for actors in (1, 2):
            cfg = CertifyConfig(**base, num_actors=actors, output_dir=str(root / f"{name}-{actors}"))
            began = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the per-run summary table
                run_certification(cfg, pool=pool)
            wall = time.perf_counter() - began
            rates[actors] = (cfg.n0 + cfg.n) * args.images / wall
            tables[actors] = read_results(cfg.output_dir).drop_columns(["time_s"])
    finally:
        pool.shutdown()
    indices = list(range(0, 1000 * args.images, 1000))[: args.ref_images]
    ref = reference_samples_per_s(model, CertifyConfig(**base, output_dir=str(root / "x")), indices)
    return {"ref": ref, "one": rates[1], "two": rates[2], "identical": float(tables[1].equals(tables[2]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--ref-images", type=int, default=1, help="images for the in-process reference")
    parser.add_argument("--shard-size", type=int, default=2_500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--models", nargs="+", default=["small_cnn", "cifar_resnet20"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    print(f"n0=100 n={args.n} images={args.images} shard_size={args.shard_size} batch_size={args.batch_size}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (others' work on the 2 cores skews the ratio)")
    print(f"{'model':<16}{'plain loop':>12}{'1 actor':>10}{'2 actors':>10}{'2/1':>7}{'1/loop':>8}  identical"
          "  load")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models:
                r = bench_model(name, args, Path(tmp))
                print(f"{name:<16}{r['ref']:>12.0f}{r['one']:>10.0f}{r['two']:>10.0f}"
                      f"{r['two'] / r['one']:>7.2f}{r['one'] / r['ref']:>8.2f}  {bool(r['identical'])!s:<9}"
                      f"  {os.getloadavg()[0]:.2f}",
                      flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
