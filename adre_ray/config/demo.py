"""``DemoConfig``: the one-command demo (train ADRE_REG and Basic, certify both, table + plot)."""

from __future__ import annotations

from dataclasses import dataclass

from adre_ray.config.base import (
    TCERTIFY_MODES,
    JobConfig,
    check,
    check_choice,
    check_int_at_least,
    check_nonnegative,
    check_positive,
    config_field,
)
from adre_ray.smoothing.params import check_alpha, check_sigma


@dataclass
class DemoConfig(JobConfig):
    """Sizes chosen so the whole demo takes well under 10 minutes on 2 CPU cores."""

    data_dir: str = config_field("auto", "CIFAR-10 folder; auto = ../shared/data/cifar10 (Parquet) when it "
                                         "exists, else data/cifar10")
    download: bool = config_field(True, "let torchvision download CIFAR-10 when it is missing (internet)")
    output_dir: str = config_field("demo_output", "folder for checkpoints, results, table, plots, MLflow "
                                                  "store")
    model: str = config_field("small_cnn", "architecture of both models")
    train_subset: int = config_field(6_000, "training images (class-balanced subset)")
    test_subset: int = config_field(500, "test images evaluated each epoch")
    epochs: int = config_field(5, "training epochs")
    batch_size: int = config_field(128, "global training batch")
    lr: float = config_field(0.1, "SGD learning rate")
    sigma: float = config_field(0.25, "noise std of training and certification")
    k: int = config_field(2, "noise draws per training example (ADRE_REG)")
    lam: float = config_field(0.1, "lambda, weight of the ADRE term")
    num_workers: int = config_field(2, "Ray Train workers")
    num_images: int = config_field(100, "test images certified")
    skip: int = config_field(100, "certify every skip-th test image")
    n0: int = config_field(100, "pilot draws per image")
    n: int = config_field(1_000, "estimation draws per image")
    alpha: float = config_field(0.001, "failure probability of each certificate")
    tcertify_mode: str = config_field("pilot", "T-CERTIFY mode: pilot | bonferroni | paper")
    num_actors: int = config_field(2, "certification actors")
    cert_batch_size: int = config_field(500, "noisy images per forward pass when certifying")
    seed: int = config_field(0, "seed of training and noise")
    experiment: str = config_field("adre-demo", "MLflow experiment")

    def check_together(self) -> None:
        check(bool(self.output_dir), "output_dir", self.output_dir, "must be a folder path")
        for name in ("train_subset", "test_subset", "epochs", "batch_size", "k", "num_workers", "num_images",
                     "skip", "n0", "n", "num_actors", "cert_batch_size"):
            check_int_at_least(name, getattr(self, name), 1)
        check_int_at_least("seed", self.seed, 0)
        check_positive("lr", self.lr)
        check_sigma(self.sigma, "sigma")
        check_nonnegative("lam", self.lam)
        check_alpha(self.alpha)
        check_choice("tcertify_mode", self.tcertify_mode, TCERTIFY_MODES)
        check(self.batch_size % self.num_workers == 0, "batch_size", self.batch_size,
              f"must be divisible by num_workers={self.num_workers}")
