"""``DemoConfig``: the one-command demo (train ADRE_REG and Basic, certify both, table + plot)."""

from __future__ import annotations

from typing import Literal

from adre_ray.checks import check
from adre_ray.config.base import JobConfig, config_dataclass, config_field
from adre_ray.config.fields import Alpha, Count, Draws, NonNegativeNumber, PositiveNumber, Seed, Sigma, named
from adre_ray.smoothing.params import TCERTIFY_MODES

FolderPath = named("must be a folder path")


@config_dataclass
class DemoConfig(JobConfig):
    """Sizes chosen so the whole demo takes well under 10 minutes on 2 CPU cores."""

    data_dir: str = config_field("auto", "CIFAR-10 folder; auto = ../shared/data/cifar10 (Parquet) when it "
                                         "exists, else data/cifar10")
    download: bool = config_field(True, "let torchvision download CIFAR-10 when it is missing (internet)")
    output_dir: FolderPath = config_field("demo_output", "folder for checkpoints, results, table, plots, "
                                                         "MLflow store")
    model: str = config_field("small_cnn", "architecture of both models")
    train_subset: Count = config_field(6_000, "training images (class-balanced subset)")
    test_subset: Count = config_field(500, "test images evaluated each epoch")
    epochs: Count = config_field(5, "training epochs")
    batch_size: Count = config_field(128, "global training batch")
    lr: PositiveNumber = config_field(0.1, "SGD learning rate")
    sigma: Sigma = config_field(0.25, "noise std of training and certification")
    k: Count = config_field(2, "noise draws per training example (ADRE_REG)")
    lam: NonNegativeNumber = config_field(0.1, "lambda, weight of the ADRE term")
    num_workers: Count = config_field(2, "Ray Train workers")
    num_images: Count = config_field(100, "test images certified")
    skip: Count = config_field(100, "certify every skip-th test image")
    n0: Draws = config_field(100, "pilot draws per image")
    n: Draws = config_field(1_000, "estimation draws per image")
    alpha: Alpha = config_field(0.001, "failure probability of each certificate")
    tcertify_mode: Literal[TCERTIFY_MODES] = config_field("pilot", "T-CERTIFY mode: pilot | bonferroni | "
                                                                   "paper")
    num_actors: Count = config_field(2, "certification actors")
    cert_batch_size: Count = config_field(500, "noisy images per forward pass when certifying")
    seed: Seed = config_field(0, "seed of training and noise")
    experiment: str = config_field("adre-demo", "MLflow experiment")

    def check_together(self) -> None:
        """The rule between fields (each field's own constraint is declared on it)."""
        check(self.batch_size % self.num_workers == 0, "batch_size", self.batch_size,
              f"must be divisible by num_workers={self.num_workers}")
