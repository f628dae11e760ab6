"""Certified validation (approx_* metrics) and the search-space file format. No Ray: fast."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from adre_ray.config.tune import TuneSpace, load_space, parse_distribution
from adre_ray.training.certified_validation import (
    ValidationRecords,
    certify_images,
    estimate_certified_accuracy,
    holdout_indices,
    metric_names,
    summarize_validation,
    validation_indices,
)

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
MARK = 1000.0
"""The label-reading model decodes round(x[0, 0, 0] / MARK). Noise of std sigma <= 1 moves that pixel by
more than MARK / 2 = 500 with probability 2 * Phi(-500) (~1e-54000): the model is exactly always right."""


class LabelReader(torch.nn.Module):
    """Logits = 10 * one_hot(round(x[:, 0, 0, 0] / MARK) + shift): always predicts the encoded label
    (shift 0) or always the next class (shift 1)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (torch.round(x[:, 0, 0, 0] / MARK).long() + self.shift) % NUM_CLASSES
        return 10.0 * torch.nn.functional.one_hot(label, NUM_CLASSES).float()


class NoiseReader(torch.nn.Module):
    """Predicts argmax of 10 pixels, which on a zero image are pure noise: a uniformly random class."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # a parameter, so train/eval mode is observable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x[:, 0, 1, :NUM_CLASSES]


def encoded_images(labels: list[int]) -> torch.Tensor:
    images = torch.zeros(len(labels), 3, 2, NUM_CLASSES)
    images[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) * MARK
    return images


LABELS = [0, 3, 7, 9, 1, 1]


@pytest.mark.parametrize("n", [64, 200])
def test_always_correct_model_certifies_every_image_at_the_cohen_radius(n: int) -> None:
    sigma, alpha = 0.25, 0.01
    metrics = estimate_certified_accuracy(LabelReader(), encoded_images(LABELS), LABELS, sigma=sigma, n0=8,
                                          n=n, alpha=alpha, radius=[0.0], batch_size=64, seed=3)
    # All n draws hit the label, so N_A = n and the one-sided Clopper-Pearson bound Beta(alpha; n, 1) is
    # alpha^(1/n) in closed form (the Beta(n, 1) CDF is p^n); CERTIFY's radius is sigma * Phi^-1 of it.
    p_lower = alpha ** (1.0 / n)
    assert stats.beta.ppf(alpha, n, 1) == pytest.approx(p_lower, rel=1e-12)
    radius = sigma * stats.norm.ppf(p_lower)
    assert metrics["approx_cert_acc_at_0.00"] == 1.0
    assert metrics["approx_abstain"] == 0.0
    assert metrics["approx_acr"] == pytest.approx(radius, rel=1e-9)
    assert metrics["approx_num_images"] == len(LABELS)
    # certified accuracy drops from 1 to 0 exactly at that radius
    just_below, just_above = radius * (1 - 1e-6), radius * (1 + 1e-6)
    records = certify_images(LabelReader(), encoded_images(LABELS), LABELS, sigma=sigma, n0=8, n=n,
                             alpha=alpha, batch_size=64, seed=3)
    assert summarize_validation(records, just_below)[f"approx_cert_acc_at_{just_below:.2f}"] == 1.0
    assert summarize_validation(records, just_above)[f"approx_cert_acc_at_{just_above:.2f}"] == 0.0
    # T-CERTIFY certifies the same class with a radius >= CERTIFY's (t = 1 is CERTIFY)
    assert metrics["approx_tcert_acc_at_0.00"] == 1.0
    assert metrics["approx_tcert_acr"] >= metrics["approx_acr"] - 1e-12
    assert metrics["approx_tcert_abstain"] == 0.0


def test_always_wrong_model_has_zero_certified_accuracy() -> None:
    metrics = estimate_certified_accuracy(LabelReader(shift=1), encoded_images(LABELS), LABELS, sigma=0.5,
                                          n0=8, n=64, alpha=0.01, radius=(0.0, 0.25), batch_size=64)
    for key in ("approx_cert_acc_at_0.00", "approx_cert_acc_at_0.25", "approx_acr", "approx_tcert_acr"):
        assert metrics[key] == 0.0, key
    assert metrics["approx_abstain"] == 0.0  # it certifies, just the wrong class


def test_random_model_abstains_and_shards_give_identical_records() -> None:
    labels = list(range(8))
    images = torch.zeros(8, 3, 2, NUM_CLASSES)
    model = NoiseReader().train()
    whole = certify_images(model, images, labels, sigma=1.0, n0=16, n=128, alpha=0.001, batch_size=64, seed=5,
                           indices=range(100, 108))
    assert model.training, "the model's train mode must be restored"
    # p_A = 1/10 for every class: CERTIFY needs the CP lower bound >= 1/2, i.e. N_A of ~64 out of 128 when
    # E[N_A] = 12.8; P(Bin(128, 0.1) >= 64) < 1e-20, so every image abstains.
    assert np.all(whole.certify_predict == -1)
    assert summarize_validation(whole, 0.0)["approx_abstain"] == 1.0
    # noise is indexed by the image's row: shards (as on DDP ranks) reproduce the same records
    parts = [certify_images(model, images[r::2], labels[r::2], sigma=1.0, n0=16, n=128, alpha=0.001,
                            batch_size=32, seed=5, indices=range(100 + r, 108, 2)) for r in (1, 0)]
    joined = ValidationRecords.concatenate(parts)
    for name in ("index", "label", "certify_predict", "certify_radius", "tcertify_predict",
                 "tcertify_radius"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name), err_msg=name)


def test_metric_names_match_the_estimate_keys() -> None:
    metrics = estimate_certified_accuracy(LabelReader(), encoded_images([2]), [2], sigma=0.25, n0=4, n=32,
                                          alpha=0.05, radius=[0.25, 0.5])
    assert list(metrics) == metric_names([0.25, 0.5])
    assert all(name.startswith("approx_") for name in metrics)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"n0": 0}, "n0="), ({"n": -3}, "n="), ({"radius": [-1.0]}, "radius="), ({"mode": "best"}, "mode="),
    ({"sigma": 0.0}, "sigma="), ({"alpha": 1.5}, "alpha="), ({"seed": -1}, "seed="),
])
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    args = dict(sigma=0.25, n0=4, n=32, alpha=0.05, radius=[0.0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        estimate_certified_accuracy(LabelReader(), encoded_images([1]), [1], **args)


def test_holdout_indices_avoid_the_training_rows() -> None:
    labels = np.repeat(np.arange(4), 25)  # 100 rows, 4 classes
    used = np.arange(0, 100, 2)
    picked = holdout_indices(labels.size, used, 20, seed=1, labels=labels)
    assert picked.size == 20 and np.all(np.diff(picked) > 0)
    assert not set(picked) & set(used)
    assert np.bincount(labels[picked], minlength=4).tolist() == [5, 5, 5, 5]  # class-balanced
    np.testing.assert_array_equal(picked, holdout_indices(labels.size, used, 20, seed=1, labels=labels))
    with pytest.raises(ValueError, match="validation.size=51"):
        holdout_indices(labels.size, used, 51, seed=1)


def test_validation_rows_are_disjoint_from_the_training_subset(cifar10_dir: Path) -> None:
    from adre_ray.data import build_dataset, dataset_labels, stratified_subset_indices

    rows = validation_indices("cifar10", cifar10_dir, split="holdout", size=64, seed=0, train_subset=128,
                              train_subset_seed=0, source="parquet")
    labels = dataset_labels(build_dataset("cifar10", cifar10_dir, "train", source="parquet", augment=False))
    trained = stratified_subset_indices(labels, 128, 0)
    assert rows.size == 64 and not set(rows.tolist()) & set(trained.tolist())
    with pytest.raises(ValueError, match="validation.split='holdout'"):
        validation_indices("cifar10", cifar10_dir, split="holdout", size=64, seed=0, train_subset=None,
                           train_subset_seed=0, source="parquet")


# -- the space file format ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_space_files_are_valid(path: Path) -> None:
    space = load_space(path)
    assert space.search and all(d.key.count(".") >= 1 or d.key in ("model", "batch_size")
                                for d in space.distributions())


def test_paper_grid() -> None:
    space = load_space(REPO / "tune_spaces" / "adre_reg_cifar10.yaml")
    grid = {d.key: d.values for d in space.distributions()}
    assert grid == {"loss.lam": (0.1, 0.2, 0.3), "loss.sigma": (0.12, 0.25, 0.5, 1.0)}


BASE_SPACE = {"search": {"loss.lam": {"grid": [0.1, 0.2]}}}


@pytest.mark.parametrize(("change", "named"), [
    ({"searhc": {}}, "searhc="),
    ({"search": {"loss.lamda": {"grid": [0.1]}}}, "search.loss.lamda="),
    ({"search": {"loss": {"grid": [0.1]}}}, "search.loss="),
    ({"search": {"loss.lam": {"gird": [0.1]}}}, "search.loss.lam.gird="),
    ({"search": {"loss.lam": {"grid": []}}}, "search.loss.lam.grid="),
    ({"search": {"loss.lam": [0.1, 0.2]}}, "search.loss.lam="),
    ({"search": {"loss.lam": {"grid": [0.1], "choice": [0.2]}}}, "search.loss.lam="),
    ({"search": {"optim.lr": {"loguniform": [0.0, 0.1]}}}, "search.optim.lr.loguniform="),
    ({"search": {"optim.lr": {"uniform": [0.2, 0.1]}}}, "search.optim.lr.uniform="),
    ({"search": {"loss.k": {"randint": [1.5, 4]}}}, "search.loss.k.randint="),
    ({"search": {"loss.epsilon": {"grid": [1.0], "scale_by": "loss.sigmaa"}}},
     "search.loss.epsilon.scale_by="),
    ({"search": {}}, "search="),
    ({"scheduler": {"name": "pbt"}}, "scheduler.name="),
    ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor="),
    ({"scheduler": {"grace_period": 5, "max_t": 2}}, "scheduler.grace_period="),
    ({"scheduler": {"max_tt": 2}}, "scheduler.max_tt="),
    ({"validation": {"n": 0}}, "validation.n="),
    ({"validation": {"split": "val"}}, "validation.split="),
    ({"validation": {"enabled": False}}, "metric="),
    ({"resources": {"num_workers": 0}}, "resources.num_workers="),
    ({"overrides": {"loss.lam": 0.3}}, "overrides.loss.lam="),
    ({"overrides": {"loss.nam": "adre_reg"}}, "overrides.loss.nam="),
    ({"mode": "maximize"}, "mode="),
    ({"num_samples": 0}, "num_samples="),
])
def test_bad_space_files_raise_naming_the_key(tmp_path: Path, change: dict, named: str) -> None:
    data = {**BASE_SPACE, **change}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as info:
        load_space(path)
    assert str(info.value).startswith(named), str(info.value)


def test_distribution_parsing() -> None:
    d = parse_distribution("loss.k", {"randint": [2, 9]})
    assert (d.kind, d.bounds, d.endpoints) == ("randint", (2, 9), (2, 8))
    d = parse_distribution("loss.epsilon", {"grid": [1, 2], "scale_by": "loss.sigma"})
    assert (d.values, d.scale_by) == ((1, 2), "loss.sigma")
    assert math.isnan(parse_distribution("optim.lr", {"choice": [0.1]}).bounds[0])
    assert TuneSpace.from_dict(BASE_SPACE).validation.enabled


def test_run_validation_gives_the_same_result_on_any_number_of_ranks(cifar10_dir: Path, monkeypatch) -> None:
    """Rank r certifies rows r, r + W, ...; the records are gathered (all_gather_object, simulated here by
    running every rank's shard in this process) and noise is indexed by row: same records and metrics for
    W = 1 and W = 3."""
    import torch.distributed as dist

    from adre_ray.config.tune import ValidationSection
    from adre_ray.training import certified_validation as cv

    class BiasedNoiseReader(torch.nn.Module):  # class 3 most of the time, else whatever the noise says
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, 1, :NUM_CLASSES] + 2.5 * torch.nn.functional.one_hot(torch.tensor(3), NUM_CLASSES)

    class Data:
        dataset, data_dir, source, train_subset, subset_seed = "cifar10", str(cifar10_dir), "parquet", 128, 0

    model = BiasedNoiseReader()
    validation = ValidationSection(enabled=True, size=7, n0=8, n=32, alpha=0.05, radius=(0.0, 0.5),
                                   batch_size=32)
    calls: dict[int, ValidationRecords] = {}
    real_certify = cv.certify_images
    rank = 0

    def record(*args, **kwargs):  # keep each rank's records
        calls[rank] = real_certify(*args, **kwargs)
        return calls[rank]

    monkeypatch.setattr(cv, "certify_images", record)
    single = cv.run_validation(model, validation, Data, 1.0)
    whole = calls.pop(0)
    world = 3

    def fake_gather(output: list, obj: list) -> None:
        for r in range(world):  # ranks not run yet contribute nothing (their result is not checked)
            output[r] = obj if r == rank else ([calls[r]] if r in calls else [])

    monkeypatch.setattr(dist, "all_gather_object", fake_gather)
    for rank in (1, 2, 0):  # noqa: B007 - read by record / fake_gather; rank 0 last gathers 1 and 2
        sharded = cv.run_validation(model, validation, Data, 1.0, rank=rank, world_size=world)
    joined = ValidationRecords.concatenate([calls[r] for r in range(world)])
    for name in ("index", "label", "certify_predict", "certify_radius", "tcertify_predict",
                 "tcertify_radius"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name), err_msg=name)
    single.pop("validation_time_s"), sharded.pop("validation_time_s")
    assert sharded == single and single["approx_num_images"] == 7
    # the counts, hence the radii, depend on the noise (distinct radii), so a wrong noise index would show
    assert len(set(whole.tcertify_radius.round(12))) > 2


def test_train_config_validation_section() -> None:
    from adre_ray.config.train import TrainConfig

    assert not TrainConfig().validation.enabled  # plain training does not certify unless asked
    cfg = TrainConfig.from_dict({"data": {"train_subset": 1000}, "validation": {"enabled": True, "n": 500}})
    assert (cfg.validation.split, cfg.validation.n) == ("holdout", 500)
    with pytest.raises(ValueError, match=r"^validation.split='holdout': .*data.train_subset is null"):
        TrainConfig.from_dict({"validation": {"enabled": True}})
    assert TrainConfig.from_dict({"validation": {"enabled": True, "split": "test"}}).validation.enabled
    with pytest.raises(ValueError, match=r"^validation.alpha=2"):
        TrainConfig.from_dict({"validation": {"alpha": 2}})
