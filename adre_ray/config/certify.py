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
    TCERTIFY_MODES,
    JobConfig,
    check,
    check_choice,
    check_grid,
    check_int_at_least,
    check_open_unit,
    config_field,
)

SPLITS = ("train", "test")
PB_BOUNDS = ("sum", "max")
"""T-CERTIFY runner-up bounds (adre_ray.smoothing.bounds): sum = eq. 14, max = CP bound of the top other."""
N_POLICIES = ("fixed", "iss")
"""Per-image sample size (adre_ray.smoothing.shortcuts): fixed = n for all, iss = chosen from the pilot."""
SHORTCUTS = ("none", "skipped_misclassified", "early_abstain", "iss")
"""Values of a result row's ``shortcut`` column (the last shortcut that changed the image's draws)."""
ABSTAINING_SHORTCUTS = ("skipped_misclassified", "early_abstain")
"""Shortcuts whose rows are abstentions by construction (never certified-correct)."""


@dataclass
class CertifyConfig(JobConfig):
    """PREDICT / CERTIFY / T-CERTIFY of one checkpoint over a strided subset of a split.

    checkpoint        model checkpoint file or folder (``save_model_checkpoint`` format)
    model_fn          instead of a checkpoint: ``module:function`` returning an nn.Module on [0, 1] images
    dataset, data_dir, split   images to certify (``adre_ray.data.load_images``)
    sigma             noise std; None -> the checkpoint's training sigma (error if it has none)
    n0, n, alpha      pilot draws, estimation draws, failure probability of each certificate
    start, skip, max_images    images start, start + skip, ... (at most max_images; None = to the end)
    tcertify_mode, grid        T-CERTIFY's choice of the alpha split t (see adre_ray.smoothing.certify)
    num_actors        certification actors; None = one per GPU (use_gpu) or one per CPU of the cluster
    use_gpu           None = use GPUs when the cluster has any
    batch_size        noisy images per forward pass (below one noise block rounded to a power of two,
                      above it to whole blocks; adre_ray.smoothing.effective_batch_size)
    shard_size        draws per task; n and n0 are cut into shards of this size (a shard's noise is
                      seeded by (seed, idx, stream, shard), so results do not depend on the actor count)
    amp, channels_last  bf16 autocast / channels_last on GPU actors (ignored on CPU)
    compile, cuda_graphs  torch.compile the actors' model (any device) / replay it as CUDA graphs (GPU only)
    images_in_flight  images sampled concurrently; None = enough to keep ~2 tasks queued per actor
    flush_images, flush_seconds   write a Parquet part every this many finished images or seconds
    actor_restarts    times Ray restarts a lost actor; its shards are re-run either way
    resource_wait_s   seconds to wait for the actors' CPUs / GPUs before refusing num_actors
    output_dir        result folder (Parquet parts + run.json); a re-run with equal settings resumes
    experiment, tracking_uri   MLflow experiment and store ("none" disables tracking)
    pb_bound          T-CERTIFY's runner-up bound: sum (eq. 14) or max (never looser; paper mode: sum)
    skip_misclassified, early_abstain, early_abstain_delta, early_abstain_wave, n_policy,
    iss_max_radius_loss   evaluation shortcuts (adre_ray.smoothing.shortcuts); they change rows, so
                      they are part of the manifest
    """

    checkpoint: str = ""
    model_fn: str | None = config_field(
        None, "instead of checkpoint: 'package.module:function' returning an nn.Module that takes [0, 1] "
              "images (e.g. denoiser + classifier); importable on every actor; needs sigma")
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
    compile: bool = config_field(False, "torch.compile (inductor) each actor's model; speed only (one "
                                 "compilation per actor: batches are padded to one shape)")
    cuda_graphs: bool = config_field(False, "GPU actors replay the compiled model as CUDA graphs "
                                     "(small models; implies compile; ignored on CPU)")
    images_in_flight: int | None = None
    flush_images: int = 10
    flush_seconds: float = 30.0
    actor_restarts: int = 3
    resource_wait_s: float = config_field(
        20.0, "seconds to wait for the CPUs / GPUs of num_actors actors (busy, or not yet added by an "
              "autoscaler) before refusing them")
    output_dir: str = "results/certify"
    experiment: str = "certify"
    tracking_uri: str | None = None
    progress: bool = True
    pb_bound: str = config_field(
        "max", "T-CERTIFY runner-up bound: sum (eq. 14) or max (CP bound of the largest other count); "
               "paper mode always uses sum")
    skip_misclassified: bool = config_field(
        False, "skip the n main draws of an image whose pilot class is not its label (table unchanged)")
    early_abstain: bool = config_field(
        False, "stop an image's main draws (in waves of shards) once a test shows it will abstain")
    early_abstain_delta: float = config_field(
        1e-4, "per-image probability that early abstain changes the outcome (0: only certain stops)")
    early_abstain_wave: int = config_field(1, "main shards per early-abstain wave (a check after each)")
    n_policy: str = config_field("fixed", "per-image n: fixed (n) or iss (chosen from the pilot counts)")
    iss_max_radius_loss: float = config_field(
        0.05, "ISS: largest tolerated loss of the plug-in CERTIFY radius (l2 units, like the radii)")

    def validate(self) -> None:
        if self.model_fn is None:
            check(isinstance(self.checkpoint, str) and self.checkpoint != "", "checkpoint", self.checkpoint,
                  "must name a model checkpoint file or folder (or set model_fn)")
        else:
            from adre_ray.models.model_fn import check_model_fn_spec  # lazily: the package imports torch

            try:
                check_model_fn_spec(self.model_fn)
            except ValueError as err:
                raise ValueError(str(err)) from None
            check(self.checkpoint == "", "checkpoint", self.checkpoint,
                  f"give checkpoint or model_fn={self.model_fn!r}, not both")
            check(self.sigma is not None, "sigma", self.sigma,
                  "must be set with model_fn (a callable records no training sigma)")
        check_choice("dataset", self.dataset, DATASETS)
        check(isinstance(self.data_dir, str) and self.data_dir != "", "data_dir", self.data_dir,
              "must name the dataset folder")
        check_choice("split", self.split, SPLITS)
        if self.sigma is not None:
            check(isinstance(self.sigma, (int, float)) and not isinstance(self.sigma, bool)
                  and math.isfinite(self.sigma) and self.sigma > 0, "sigma", self.sigma,
                  "must be a finite number > 0 (or null to take it from the checkpoint)")
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
        check(isinstance(self.compile, bool), "compile", self.compile, "must be true or false")
        check(isinstance(self.cuda_graphs, bool), "cuda_graphs", self.cuda_graphs, "must be true or false")
        if self.images_in_flight is not None:
            check_int_at_least("images_in_flight", self.images_in_flight, 1)
        check_int_at_least("flush_images", self.flush_images, 1)
        check(isinstance(self.flush_seconds, (int, float)) and not isinstance(self.flush_seconds, bool)
              and self.flush_seconds >= 0, "flush_seconds", self.flush_seconds, "must be a number >= 0")
        check_int_at_least("actor_restarts", self.actor_restarts, 0)
        check(isinstance(self.resource_wait_s, (int, float)) and not isinstance(self.resource_wait_s, bool)
              and math.isfinite(self.resource_wait_s) and self.resource_wait_s >= 0, "resource_wait_s",
              self.resource_wait_s, "must be a finite number of seconds >= 0")
        check(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir", self.output_dir,
              "must name the result folder")
        check(isinstance(self.experiment, str) and self.experiment != "", "experiment", self.experiment,
              "must be a non-empty MLflow experiment name")
        check(isinstance(self.progress, bool), "progress", self.progress, "must be true or false")
        self._validate_shortcuts()

    def _validate_shortcuts(self) -> None:
        check_choice("pb_bound", self.pb_bound, PB_BOUNDS)
        for name in ("skip_misclassified", "early_abstain"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")
        delta = self.early_abstain_delta
        check(isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 <= delta < 1,
              "early_abstain_delta", delta, "must be a number in [0, 1)")
        check_int_at_least("early_abstain_wave", self.early_abstain_wave, 1)
        check_choice("n_policy", self.n_policy, N_POLICIES)
        loss = self.iss_max_radius_loss
        check(isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)
              and loss >= 0, "iss_max_radius_loss", loss, "must be a finite number >= 0")

    def uses_shortcuts(self) -> bool:
        """True when a shortcut may change an image's draws (then pilot shards run before main ones)."""
        return self.skip_misclassified or self.early_abstain or self.n_policy != "fixed"

    def num_shards(self, total: int) -> int:
        """Shards that ``total`` draws are cut into: ceil(total / shard_size)."""
        return -(-total // self.shard_size)
