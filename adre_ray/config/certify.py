"""Config of the certification job (``adre-ray certify``, ``jobs/certify.py``).

The paper's protocol (Cohen et al. 2019, seed paper Table 1): every ``skip``-th test image, n0 = 100
pilot draws to pick the class, n = 100,000 draws for the bound, alpha = 0.001. Everything that changes a
result row (checkpoint, dataset, split, sigma, n0, n, alpha, seed, mode, grid, shard_size) is recorded in
the output folder's manifest; everything else (actors, batch size, AMP off/on aside) only changes speed.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from adre_ray.checks import check, is_number
from adre_ray.config.base import JobConfig, config_dataclass, config_field
from adre_ray.config.fields import (
    Alpha,
    Count,
    Draws,
    Grid,
    NonNegativeNumber,
    Probability,
    Seconds,
    Seed,
    core_check,
    finite,
    int_at_least,
    named,
)
from adre_ray.data.info import DATASETS, SPLITS
from adre_ray.precision import PRECISIONS, check_precision, effective_precision
from adre_ray.smoothing.bounds import PB_BOUNDS
from adre_ray.smoothing.params import DEFAULT_GRID, TCERTIFY_MODES, check_sigma
from adre_ray.smoothing.shortcuts import EARLY_ABSTAIN_RULES, N_POLICIES


def _check_sigma_or_checkpoint(value: float, field: str) -> None:
    try:
        check_sigma(value, field)
    except ValueError as err:
        raise ValueError(f"{err} (or null to take it from the checkpoint)") from None


def _check_radii(value: tuple[float, ...], field: str) -> None:
    check(all(is_number(g) and math.isfinite(g) and g >= 0 for g in value), field, value,
          "must be finite radii >= 0 (or null for the default grid)")


SigmaOrCheckpoint = Annotated[float, core_check(_check_sigma_or_checkpoint)]
Radii = Annotated[tuple[float, ...], core_check(_check_radii)]
ClassCount = int_at_least(2)
Radius = finite("must be a finite radius >= 0 (or null)", ge=0)
PositiveSeconds = finite("must be a finite number of seconds > 0", gt=0)
DataFolder = named("must name the dataset folder")
ResultFolder = named("must name the result folder")
ExperimentName = named("must be a non-empty MLflow experiment name")


@config_dataclass
class CertifyConfig(JobConfig):
    """PREDICT / CERTIFY / T-CERTIFY of one checkpoint over a strided subset of a split.

    A shard's noise is seeded by (seed, idx, stream, shard), so results do not depend on the actor count.
    Each field's meaning is its ``config_field`` text (shown by ``adre-ray certify --help``).
    """

    checkpoint: str = config_field("", "model checkpoint file or folder; a local path or an s3:// gs:// "
                                       "file:// URI")
    model_fn: str | None = config_field(
        None, "instead of checkpoint: 'package.module:function' returning an nn.Module that takes [0, 1] "
              "images (e.g. denoiser + classifier); importable on every actor; needs sigma")
    dataset: Literal[DATASETS] = config_field(
        "cifar10", "dataset: cifar10 | imagenet | arrays (any sample shape: a .npz "
                   "with x, y or Parquet with a fixed_shape_tensor x; see "
                   "adre_ray.data.arrays)")
    data_dir: DataFolder = config_field(
        "data/cifar10", "dataset folder (adre_ray.data.load_images); for arrays the "
                        ".npz / .parquet file or its folder")
    num_classes: ClassCount | None = config_field(
        None, "class count; null = the dataset's, else the checkpoint's, else the model's output size "
              "(read on the first batch)")
    split: Literal[SPLITS] = config_field("test", "split to certify: train | test")
    sigma: SigmaOrCheckpoint | None = config_field(None, "noise std; null = the checkpoint's training sigma")
    n0: Draws = config_field(100, "pilot draws per image (choose the class cA)")
    n: Draws = config_field(100_000, "estimation draws per image (the bound)")
    alpha: Alpha = config_field(0.001, "failure probability of each certificate, in (0, 1)")
    start: Seed = config_field(0, "first image index")
    skip: Count = config_field(20, "certify images start, start + skip, ...")
    max_images: Count | None = config_field(None, "at most this many images; null = to the end of the split")
    tcertify_mode: Literal[TCERTIFY_MODES] = config_field(
        "pilot", "T-CERTIFY's choice of the alpha split t: pilot | bonferroni "
                 "| paper")
    grid: Grid = config_field(DEFAULT_GRID, "T-CERTIFY's grid of t values in (0, 1], comma-separated")
    num_actors: Count | None = config_field(None, "certification actors; null = one per GPU (use_gpu) or per "
                                                  "CPU of the cluster")
    use_gpu: bool | None = config_field(None, "run actors on GPUs; null = when the cluster has any")
    batch_size: Count | None = config_field(None, "noisy images per forward pass (rounded to the noise "
                                                  "blocks: adre_ray.smoothing.effective_batch_size); null = "
                                                  "1000 on GPU actors, 128 on CPU actors (cache-sized: "
                                                  "faster on CPU)")
    shard_size: Count = config_field(10_000, "draws per task: n0 and n are cut into shards of this size")
    seed: Seed = config_field(0, "noise seed")
    precision: Literal[PRECISIONS] = config_field(
        "auto", "base classifier precision: auto (bf16 on GPU, fp32 on CPU) | "
                "fp32 | bf16 (also on CPU; a different, deterministic classifier: "
                "recorded in every row and the manifest, never mixed on resume)")
    amp: bool | None = config_field(None, "deprecated: true = precision auto, false = precision fp32")
    channels_last: bool = config_field(True, "channels_last memory format (GPU and CPU actors; on CPU the "
                                             "counts equal the default layout's)")
    compile: bool = config_field(False, "torch.compile (inductor) each actor's model; speed only (one "
                                        "compilation per actor: batches are padded to one shape)")
    cuda_graphs: bool = config_field(False, "GPU actors replay the compiled model as CUDA graphs "
                                            "(small models; implies compile; ignored on CPU)")
    images_in_flight: Count | None = config_field(
        None, "images sampled concurrently; null = enough to keep every actor's calls full "
              "(at most 1,024)")
    flush_images: Count = config_field(10, "write a Parquet part every this many finished images")
    flush_seconds: NonNegativeNumber = config_field(30.0, "... or every this many seconds")
    actor_restarts: Seed = config_field(3, "times a lost actor is replaced; its shards are re-run either way")
    resource_wait_s: Seconds = config_field(
        20.0, "seconds to wait for the CPUs / GPUs of num_actors actors (busy, or not yet added by an "
              "autoscaler) before refusing them")
    stall_timeout_s: PositiveSeconds = config_field(
        1800.0, "seconds without any finished shard (actors lost, a node gone, nothing schedulable) before "
                "the job stops with exit 2, finished images kept; a line on stderr every minute meanwhile")
    deterministic: bool = config_field(
        False, "deterministic algorithms, no cuDNN autotuning, no TF32 (same logits on a re-run on the same "
               "device model; slower, see docs/performance.md)")
    allow_mixed_devices: bool = config_field(
        False, "let a result folder hold rows from another device model or numeric setting (recorded in "
               "_run.json); by default resuming on other devices is refused")
    autoscale_wait_s: Seconds = config_field(
        900.0, "seconds to wait for nodes an autoscaler is adding (a line on stderr each minute) before "
               "refusing; used only when the cluster's autoscaler can add the actors' CPUs / GPUs")
    shared_filesystem: bool = config_field(
        False, "local paths (checkpoint) are the same on every node (NFS, FSx); else refused when the "
               "cluster spans nodes")
    output_dir: ResultFolder = config_field(
        "results/certify", "result folder (Parquet parts + _run.json), local or "
                           "s3:// gs:// file://; a re-run with equal settings "
                           "resumes")
    experiment: ExperimentName = config_field("certify", "MLflow experiment")
    tracking_uri: str | None = config_field(None, "MLflow store; null = $MLFLOW_TRACKING_URI; none = off")
    progress: bool = config_field(True, "progress bar")
    pb_bound: Literal[PB_BOUNDS] = config_field(
        "max", "T-CERTIFY runner-up bound: sum (eq. 14) or max (CP bound of the largest other count); "
               "paper mode always uses sum")
    skip_misclassified: bool = config_field(
        False, "skip the n main draws of an image whose pilot class is not its label (table unchanged)")
    early_abstain: bool = config_field(
        False, "stop an image's main draws (in waves of shards) once a test shows it will abstain")
    early_abstain_delta: Probability = config_field(
        1e-4, "per-image probability that early abstain changes the outcome (0: only certain stops)")
    early_abstain_wave: Count = config_field(1, "main shards per early-abstain wave (a check after each)")
    early_abstain_rule: Literal[EARLY_ABSTAIN_RULES] = config_field(
        "product", "early-abstain test: product (tighter, same delta) or cp (the rule of schema-3 runs)")
    stop_when_decided: bool = config_field(
        False, "stop an image's main draws (looks after 1, 2, 4, ... shards) once its bucket of decide_grid "
               "is decided; table changed with probability <= decide_delta per image, certificates valid at "
               "alpha")
    decide_grid: Radii | None = config_field(
        None, "radii of the table stop_when_decided keeps (comma-separated, 0 added); null = 0, 0.25, ... up "
              "to the largest radius certifiable at n")
    decide_delta: Probability = config_field(1e-4, "stop_when_decided: per-image probability that the table "
                                                   "bucket differs from the full run's")
    target_radius: Radius | None = config_field(
        None, "certify at this radius only: stop each image once a sequential test decides (rows get "
              "decision certified | not_certified | abstain; wrong accept <= alpha)")
    n_policy: Literal[N_POLICIES] = config_field(
        "fixed", "per-image n: fixed (n) or iss (chosen from the pilot counts)")
    iss_max_radius_loss: NonNegativeNumber = config_field(
        0.05, "ISS: largest tolerated loss of the plug-in CERTIFY radius (l2 units, like the radii)")

    def check_together(self) -> None:
        """The rules between fields (each field's own constraint is declared on it)."""
        if self.model_fn is None:
            check(self.checkpoint != "", "checkpoint", self.checkpoint,
                  "must name a model checkpoint file or folder (or set model_fn)")
        else:
            from adre_ray.models.model_fn import check_model_fn_spec  # lazily: it imports torch

            try:
                check_model_fn_spec(self.model_fn)
            except ValueError as err:
                raise ValueError(str(err)) from None
            check(self.checkpoint == "", "checkpoint", self.checkpoint,
                  f"give checkpoint or model_fn={self.model_fn!r}, not both")
            check(self.sigma is not None, "sigma", self.sigma,
                  "must be set with model_fn (a callable records no training sigma)")
        check_precision("", self.precision, self.amp)
        radius = self.target_radius
        if radius is not None:
            check(not self.stop_when_decided, "target_radius", radius,
                  "answers one radius; do not combine it with stop_when_decided")
        if self.stop_when_decided or radius is not None:
            check(not self.early_abstain, "early_abstain", self.early_abstain,
                  "is part of stop_when_decided / target_radius (they stop abstaining images themselves); "
                  "drop early_abstain")

    @property
    def precision_setting(self) -> str:
        """``precision``, or what the deprecated ``amp`` meant (auto | fp32 | bf16; resolve per device)."""
        return effective_precision(self.precision, self.amp)

    def sequential(self) -> bool:
        """True when main draws are released look by look (stop_when_decided or target_radius)."""
        return self.stop_when_decided or self.target_radius is not None

    def uses_shortcuts(self) -> bool:
        """True when a shortcut may change an image's draws (then pilot shards run before main ones)."""
        return self.skip_misclassified or self.early_abstain or self.n_policy != "fixed" or self.sequential()

    def num_shards(self, total: int) -> int:
        """Shards that ``total`` draws are cut into: ceil(total / shard_size)."""
        return -(-total // self.shard_size)
