"""Config of the certification job (``adre-ray certify``, ``jobs/certify.py``).

The paper's protocol (Cohen et al. 2019, seed paper Table 1): every ``skip``-th test image, n0 = 100
pilot draws to pick the class, n = 100,000 draws for the bound, alpha = 0.001. Everything that changes a
result row (checkpoint, dataset, split, sigma, n0, n, alpha, seed, mode, grid, shard_size) is recorded in
the output folder's manifest; everything else (actors, batch size, AMP off/on aside) only changes speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adre_ray.config.base import (
    DATASETS,
    DEFAULT_GRID,
    MAX_SIGMA,
    TCERTIFY_MODES,
    JobConfig,
    check,
    check_choice,
    check_grid,
    check_int_at_least,
    check_open_unit,
)

SPLITS = ("train", "test")


@dataclass
class CertifyConfig(JobConfig):
    """PREDICT / CERTIFY / T-CERTIFY of one checkpoint over a strided subset of a split.

    checkpoint        model checkpoint file or folder (``save_model_checkpoint`` format)
    dataset, data_dir, split   images to certify (``adre_ray.data.load_images``)
    sigma             noise std; None -> the checkpoint's training sigma (error if it has none)
    n0, n, alpha      pilot draws, estimation draws, failure probability of each certificate
    start, skip, max_images    images start, start + skip, ... (at most max_images; None = to the end)
    tcertify_mode, grid        T-CERTIFY's choice of the alpha split t (see adre_ray.smoothing.certify)
    num_actors        certification actors; None = one per GPU (use_gpu) or one per CPU of the cluster
    use_gpu           None = use GPUs when the cluster has any
    batch_size        noisy images per forward pass (rounded to whole noise blocks of 32)
    shard_size        draws per task; n and n0 are cut into shards of this size (a shard's noise is
                      seeded by (seed, idx, stream, shard), so results do not depend on the actor count)
    amp, channels_last  bf16 autocast / channels_last on GPU actors (ignored on CPU)
    images_in_flight  images sampled concurrently; None = enough to keep ~2 tasks queued per actor
    flush_images, flush_seconds   write a Parquet part every this many finished images or seconds
    actor_restarts    times Ray restarts a lost actor; its shards are re-run either way
    output_dir        result folder (Parquet parts + run.json); a re-run with equal settings resumes
    experiment, tracking_uri   MLflow experiment and store ("none" disables tracking)
    """

    checkpoint: str = ""
    dataset: str = "cifar10"
    data_dir: str = "data/cifar10"
    split: str = "test"
    sigma: float | None = None
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    start: int = 0
    skip: int = 20
    max_images: int | None = None
    tcertify_mode: str = "pilot"
    grid: tuple[float, ...] = DEFAULT_GRID
    num_actors: int | None = None
    use_gpu: bool | None = None
    batch_size: int = 1000
    shard_size: int = 10_000
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    images_in_flight: int | None = None
    flush_images: int = 10
    flush_seconds: float = 30.0
    actor_restarts: int = 3
    output_dir: str = "results/certify"
    experiment: str = "certify"
    tracking_uri: str | None = None
    progress: bool = True

    def validate(self) -> None:
        check(isinstance(self.checkpoint, str) and self.checkpoint != "", "checkpoint", self.checkpoint,
              "must name a model checkpoint file or folder")
        check_choice("dataset", self.dataset, DATASETS)
        check(isinstance(self.data_dir, str) and self.data_dir != "", "data_dir", self.data_dir,
              "must name the dataset folder")
        check_choice("split", self.split, SPLITS)
        if self.sigma is not None:
            check(isinstance(self.sigma, (int, float)) and not isinstance(self.sigma, bool)
                  and math.isfinite(self.sigma) and 0 < self.sigma <= MAX_SIGMA, "sigma", self.sigma,
                  f"must be a finite number in (0, {MAX_SIGMA:g}] (or null to take it from the checkpoint)")
        check_int_at_least("n0", self.n0, 1)
        check_int_at_least("n", self.n, 1)
        check_open_unit("alpha", self.alpha)
        check_int_at_least("start", self.start, 0)
        check_int_at_least("skip", self.skip, 1)
        if self.max_images is not None:
            check_int_at_least("max_images", self.max_images, 1)
        check_choice("tcertify_mode", self.tcertify_mode, TCERTIFY_MODES)
        check_grid("grid", self.grid)
        if self.num_actors is not None:
            check_int_at_least("num_actors", self.num_actors, 1)
        check(self.use_gpu is None or isinstance(self.use_gpu, bool), "use_gpu", self.use_gpu,
              "must be true, false or null (auto)")
        check_int_at_least("batch_size", self.batch_size, 1)
        check_int_at_least("shard_size", self.shard_size, 1)
        check_int_at_least("seed", self.seed, 0)
        check(isinstance(self.amp, bool), "amp", self.amp, "must be true or false")
        check(isinstance(self.channels_last, bool), "channels_last", self.channels_last,
              "must be true or false")
        if self.images_in_flight is not None:
            check_int_at_least("images_in_flight", self.images_in_flight, 1)
        check_int_at_least("flush_images", self.flush_images, 1)
        check(isinstance(self.flush_seconds, (int, float)) and not isinstance(self.flush_seconds, bool)
              and math.isfinite(self.flush_seconds) and self.flush_seconds >= 0, "flush_seconds",
              self.flush_seconds, "must be a finite number >= 0")
        check_int_at_least("actor_restarts", self.actor_restarts, 0)
        check(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir", self.output_dir,
              "must name the result folder")
        check(isinstance(self.experiment, str) and self.experiment != "", "experiment", self.experiment,
              "must be a non-empty MLflow experiment name")
        check(isinstance(self.progress, bool), "progress", self.progress, "must be true or false")

    def num_shards(self, total: int) -> int:
        """Shards that ``total`` draws are cut into: ceil(total / shard_size)."""
        return -(-total // self.shard_size)
