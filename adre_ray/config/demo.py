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
    check_open_unit,
    check_positive,
    check_sigma,
)


@dataclass
class DemoConfig(JobConfig):
    """Sizes chosen so the whole demo takes well under 10 minutes on 2 CPU cores.

    data_dir "auto": ``../shared/data/cifar10`` (Parquet) when it exists, else ``data/cifar10`` with
    torchvision's download (needs internet).
    """

    data_dir: str = "auto"
    download: bool = True
    output_dir: str = "demo_output"
    model: str = "small_cnn"
    train_subset: int = 6_000
    test_subset: int = 500
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    sigma: float = 0.25
    k: int = 2
    lam: float = 0.1
    num_workers: int = 2
    num_images: int = 100
    skip: int = 100
    n0: int = 100
    n: int = 1_000
    alpha: float = 0.001
    tcertify_mode: str = "pilot"
    num_actors: int = 2
    cert_batch_size: int = 500
    seed: int = 0
    experiment: str = "adre-demo"

    def validate(self) -> None:
        check(bool(self.output_dir), "output_dir", self.output_dir, "must be a folder path")
        for name in ("train_subset", "test_subset", "epochs", "batch_size", "k", "num_workers", "num_images",
                     "skip", "n0", "n", "num_actors", "cert_batch_size"):
            check_int_at_least(name, getattr(self, name), 1)
        check_int_at_least("seed", self.seed, 0)
        check_positive("lr", self.lr)
        check_sigma("sigma", self.sigma)
        check_nonnegative("lam", self.lam)
        check_open_unit("alpha", self.alpha)
        check_choice("tcertify_mode", self.tcertify_mode, TCERTIFY_MODES)
        check(self.batch_size % self.num_workers == 0, "batch_size", self.batch_size,
              f"must be divisible by num_workers={self.num_workers}")
