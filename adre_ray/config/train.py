"""Config of the training job (``adre-ray train``, ``jobs/train.py``): DDP under Ray Train.

One ``TrainConfig`` holds every tunable, in sections (YAML mappings; dotted keys on the command line,
``--set loss.lam=0.2``). Defaults reproduce the seed paper's CIFAR-10 ADRE_REG run: ResNet-110, 150
epochs, batch 400, SGD lr 0.1 / 10 every 50 epochs, sigma 0.25, k 8, lambda 0.2.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from adre_ray import storage
from adre_ray.checks import MAX_INT, check
from adre_ray.config.base import JobConfig, config_dataclass, config_field
from adre_ray.config.fields import (
    Count,
    NonNegativeInt,
    NonNegativeNumber,
    PositiveNumber,
    Rule,
    Seconds,
    Seed,
    core_check,
    non_empty,
)
from adre_ray.config.loss import LossSection
from adre_ray.config.validation import ValidationSection
from adre_ray.data.info import DATASETS, SOURCES
from adre_ray.precision import PRECISIONS, check_precision, effective_precision
from adre_ray.training.names import SCHEDULES

DATA_SOURCES = SOURCES
DATA_LOADERS = ("auto", "ray_data", "torch")


def _check_run_name(value: str, field: str) -> None:
    check("/" not in value and "\\" not in value, field, value, "must not contain a slash")


FolderPath = non_empty("folder path")
ExperimentName = non_empty("MLflow experiment name")
StorageLocation = non_empty("folder or URI")
TrackingUri = non_empty("MLflow tracking URI (or 'none')")
RunName = Annotated[non_empty("run name"), core_check(_check_run_name)]
Momentum = Annotated[float, Field(ge=0, lt=1), Rule("must lie in [0, 1)")]
DecayFactor = Annotated[float, Field(gt=0, le=1), Rule("must lie in (0, 1]")]
CpuShare = Annotated[float, Field(ge=0), Rule("must be a number >= 0")]
Restarts = Annotated[int, Field(ge=-1, le=MAX_INT), Rule("must be an integer >= -1")]


@config_dataclass
class DataSection:
    """Where the images come from and which of them are used."""

    dataset: Literal[DATASETS] = config_field(
        "cifar10", "dataset: cifar10 | imagenet | arrays (train.npz / test.npz or train/ test/ Parquet in "
                   "data_dir; no augmentation)")
    data_dir: FolderPath = config_field(
        "data/cifar10", "dataset folder (Parquet, torchvision or image-folder layout; arrays: train.npz and "
                        "test.npz)")
    source: Literal[SOURCES] = config_field(
        "auto", "layout of data_dir: auto | parquet | torchvision | imagefolder")
    download: bool = config_field(False, "let torchvision download CIFAR-10 into data_dir (needs internet)")
    train_subset: Count | None = config_field(None, "train on a seeded class-balanced subset of this many "
                                                    "images (null = all)")
    test_subset: Count | None = config_field(None, "evaluate each epoch on a seeded subset of this many test "
                                                   "images (null = all)")
    subset_seed: Seed = config_field(0, "seed of both subsets")
    augment: bool = config_field(True, "random crop + flip on the training images")
    loader_workers: NonNegativeInt = config_field(
        4, "DataLoader worker processes per training worker (0 = in-process)")
    loader: Literal[DATA_LOADERS] = config_field(
        "auto", "training input: ray_data (Ray Data streaming from Parquet, local or URI) | torch "
                "(DataLoader) | auto (ray_data for ImageNet Parquet and URIs)")
    shuffle_buffer: NonNegativeInt = config_field(
        2000, "ray_data: rows in each worker's seeded local shuffle buffer (0 = none; the file order is "
              "shuffled every epoch regardless)")
    prefetch_batches: NonNegativeInt = config_field(2, "ray_data: batches each worker prefetches")
    decode_cpus: CpuShare = config_field(1.0, "ray_data: CPUs reserved per read / decode task (0 = share "
                                              "the training workers' CPUs)")
    decode_batch_size: Count = config_field(64, "ray_data: images per decode task batch")
    deterministic: bool = config_field(False, "ray_data: keep Ray Data's block order (preserve_order); "
                                              "slower; augmentation draws stay unseeded")


@config_dataclass
class OptimSection:
    """SGD."""

    lr: PositiveNumber = config_field(0.1, "SGD learning rate at the global batch size")
    momentum: Momentum = config_field(0.9, "SGD momentum, in [0, 1)")
    weight_decay: NonNegativeNumber = config_field(1e-4, "weight decay")
    nesterov: bool = config_field(False, "Nesterov momentum")
    decay_norm_and_bias: bool = config_field(False, "apply weight decay to biases and norm parameters too "
                                                    "(the original papers do)")


@config_dataclass
class ScheduleSection:
    """Learning-rate schedule, applied per iteration (adre_ray.training.build_scheduler)."""

    name: Literal[SCHEDULES] = config_field("step", "step (lr * gamma every step_size epochs) | cosine")
    epochs: Count = config_field(150, "training epochs")
    warmup_epochs: NonNegativeInt = config_field(0, "linear learning-rate warm-up epochs")
    step_size: Count = config_field(50, "epochs between decays (step)")
    gamma: DecayFactor = config_field(0.1, "decay factor (step), in (0, 1]")


MIN_WORKER_BATCH = 16
"""Images per GPU worker below which BatchNorm's per-worker statistics get noisy enough to hurt accuracy
(Wu & He, Group Normalization, 2018, Fig. 1: ResNet-50 error rises steadily below 16 images per GPU)."""


@config_dataclass
class ScalingSection:
    """Ray Train workers and their resources."""

    num_workers: Count = config_field(
        1, "Ray Train workers (DDP processes); the global batch is split evenly")
    use_gpu: bool = config_field(False, "one GPU per worker (nccl, bf16 autocast, channels_last); else CPU "
                                        "(gloo)")
    cpus_per_worker: Count = config_field(1, "CPUs reserved per worker")
    gpus_per_worker: PositiveNumber = config_field(
        1.0, "GPUs per worker when use_gpu: must be 1 (one DDP rank per GPU)")
    sync_batchnorm: bool = config_field(False, "SyncBatchNorm: BatchNorm statistics over the global batch "
                                               "(one all-reduce per BN layer per step); lifts "
                                               "min_worker_batch")
    min_worker_batch: Count = config_field(
        MIN_WORKER_BATCH, "smallest per-GPU-worker batch (images) accepted without sync_batchnorm")


@config_dataclass
class RunSection:
    """Run identity, storage, tracking, fault tolerance and speed switches."""

    name: RunName | None = config_field(None, "Ray Train run name; the same name and storage_path resume it "
                                              "(null = <model>_<loss>_<timestamp>, a new run)")
    experiment: ExperimentName = config_field("adre-train", "MLflow experiment")
    storage_path: StorageLocation = config_field(
        "runs", "where Ray Train writes checkpoints: a local folder or a URI (s3://, gs://, file://)")
    tracking_uri: TrackingUri | None = config_field(
        None, "MLflow store; null = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; none = off")
    shared_filesystem: bool = config_field(False, "local paths (storage_path, data.data_dir, a SQLite store) "
                                                  "are the same on every node (NFS, FSx); else refused when "
                                                  "the cluster spans nodes")
    resource_wait_s: Seconds = config_field(
        120.0, "seconds training waits while the cluster (and its autoscaler) cannot hold the worker group, "
               "e.g. after a node died, before stopping with a message (a re-run resumes)")
    autoscale_wait_s: Seconds = config_field(
        900.0, "seconds training waits for a worker group's nodes when the cluster's autoscaler can add "
               "them (a lost node's replacement) before stopping (a re-run resumes)")
    max_failures: Restarts = config_field(0, "restarts of the worker group after a failure, from the latest "
                                             "checkpoint (-1 = unlimited)")
    checkpoints_to_keep: Count = config_field(2, "newest checkpoints kept in storage")
    seed: Seed = config_field(0, "model init, data order and noise are functions of (seed, epoch, rank)")
    precision: Literal[PRECISIONS] = config_field(
        "auto", "auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 (also on CPU); the loss and ADRE "
                "terms stay fp32")
    amp: bool | None = config_field(None, "deprecated: true = precision auto, false = precision fp32")
    channels_last: bool = config_field(True, "channels_last memory format (GPU and CPU)")
    compile: bool = config_field(False, "torch.compile the model")
    eval_max_batches: Count | None = config_field(
        None, "cap on test batches per epoch (null = the whole test subset)")
    train_max_batches: Count | None = config_field(None, "cap on training batches per epoch (null = full "
                                                         "epochs)")
    progress: bool = config_field(False, "per-batch progress bar on rank 0")
    verbose: bool = config_field(False, "Ray Train's own INFO logging")
    deterministic: bool = config_field(False, "deterministic algorithms, no cuDNN autotuning, no TF32 "
                                              "(slower; see docs/performance.md)")

    @property
    def precision_setting(self) -> str:
        """``precision``, or what the deprecated ``amp`` meant (auto | fp32 | bf16; resolve per device)."""
        return effective_precision(self.precision, self.amp)


@config_dataclass
class TrainConfig(JobConfig):
    """Training of one base classifier (see the section classes for every field)."""

    model: str = config_field("cifar_resnet110", "registered architecture (adre_ray.models.MODEL_NAMES)")
    model_fn: str | None = config_field(
        None, "instead of model: 'package.module:function' returning the whole nn.Module (normalization "
              "included) on inputs in the data's space; required for data.dataset=arrays")
    batch_size: Count = config_field(400, "global batch per optimizer step, split over scaling.num_workers")
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection, metadata={
        "help": "the training loss: loss.name and the parameters the losses declare (adre_ray.config.loss)"})
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    @property
    def per_worker_batch_size(self) -> int:
        """batch_size / num_workers (validate() guarantees it divides)."""
        return self.batch_size // self.scaling.num_workers

    def check_together(self) -> None:
        """The rules between fields, ``ValueError("<section.field>=<value>: <why>")`` for the first broken
        one (each field's own constraint is declared on it and checked before)."""
        from adre_ray.models import check_model_name  # the registry (imports torch), lazily
        from adre_ray.models.model_fn import check_model_fn_spec

        try:
            if self.model_fn is not None:
                check_model_fn_spec(self.model_fn)
            else:
                check_model_name(self.model)
        except ValueError as err:
            raise ValueError(str(err)) from None
        check(self.model_fn is not None or self.data.dataset != "arrays", "model_fn", self.model_fn,
              "must be set for data.dataset='arrays' (the registered models take cifar10 / imagenet images)")
        self._validate_data()
        o, s = self.optim, self.schedule
        check(not o.nesterov or o.momentum > 0, "optim.nesterov", o.nesterov, "needs optim.momentum > 0")
        check(s.warmup_epochs < s.epochs, "schedule.warmup_epochs", s.warmup_epochs,
              f"must be < schedule.epochs={s.epochs}")
        gpus = self.scaling.gpus_per_worker
        check(not self.scaling.use_gpu or gpus == 1, "scaling.gpus_per_worker", gpus,
              "must be 1 with scaling.use_gpu (below 1 puts two DDP ranks on one GPU, which NCCL refuses; "
              "above 1 leaves GPUs idle): one worker per GPU")
        check_precision("run.", self.run.precision, self.run.amp)
        self.validation.validate(data=self.data)
        workers = self.scaling.num_workers
        check(self.batch_size % workers == 0, "batch_size", self.batch_size,
              f"must be divisible by scaling.num_workers={workers}")
        self._check_worker_batch()
        if self.data.train_subset is not None:
            check(self.data.train_subset >= self.batch_size, "data.train_subset", self.data.train_subset,
                  f"must be >= batch_size={self.batch_size} (each worker drops its last partial batch)")

    def _check_worker_batch(self) -> None:
        """GPU workers: batch_size / num_workers >= scaling.min_worker_batch, unless sync_batchnorm (then
        the global batch must be). CPU runs (tests, demos, small models) are not checked."""
        s = self.scaling
        if not s.use_gpu:
            return
        if s.sync_batchnorm:
            check(self.batch_size >= s.min_worker_batch, "batch_size", self.batch_size,
                  f"must be >= scaling.min_worker_batch={s.min_worker_batch} (BatchNorm statistics)")
            return
        check(self.per_worker_batch_size >= s.min_worker_batch, "batch_size", self.batch_size,
              f"gives {self.per_worker_batch_size} images per GPU worker (scaling.num_workers="
              f"{s.num_workers}), below scaling.min_worker_batch={s.min_worker_batch}: BatchNorm over so few "
              "images trains badly; raise batch_size, use fewer workers, or set scaling.sync_batchnorm=true")

    def _validate_data(self) -> None:
        d = self.data
        check(d.source != "torchvision" or d.dataset == "cifar10", "data.source", d.source,
              "torchvision's layout is supported for cifar10 only")
        check(d.dataset != "arrays" or d.loader != "ray_data", "data.loader", d.loader,
              "arrays datasets are read by the torch DataLoader (use auto or torch)")
        check(d.loader != "ray_data" or d.train_subset is None, "data.loader", d.loader,
              "does not support data.train_subset (use data.loader=torch)")
        is_uri = storage.is_remote(d.data_dir)
        check(d.loader != "torch" or not is_uri, "data.loader", d.loader,
              f"cannot read data.data_dir={d.data_dir!r} (a URI: use ray_data)")
        check(not is_uri or d.train_subset is None, "data.train_subset", d.train_subset,
              f"not supported for a URI data.data_dir={d.data_dir!r} (Ray Data input)")
