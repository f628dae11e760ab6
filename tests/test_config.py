"""TrainConfig: YAML + overrides, validation naming the bad field, the shipped job configs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from adre_ray.config import load_config
from adre_ray.config.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((REPO / "jobs" / "configs").glob("train_*.yaml"))


def test_defaults_are_the_paper_cifar10_adre_reg_run():
    cfg = TrainConfig()
    cfg.validate()
    assert (cfg.model, cfg.batch_size) == ("cifar_resnet110", 400)
    assert (cfg.schedule.name, cfg.schedule.epochs, cfg.schedule.step_size) == ("step", 150, 50)
    assert (cfg.loss.name, cfg.loss.sigma, cfg.loss.k, cfg.loss.lam) == ("adre_reg", 0.25, 8, 0.2)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.gamma) == (0.1, 1e-4, 0.1)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: small_cnn\nbatch_size: 64\nloss:\n  lam: 0.1\n  k: 2\n"
                    "scaling:\n  num_workers: 2\n")
    cfg = load_config(TrainConfig, path, ["loss.lam=0.3", "schedule.epochs=3", "run.name=abc",
                                          "data.test_subset=null", "optim.lr=1"])
    assert cfg.model == "small_cnn" and cfg.batch_size == 64 and cfg.per_worker_batch_size == 32
    assert cfg.loss.lam == 0.3 and cfg.loss.k == 2 and cfg.schedule.epochs == 3
    assert cfg.run.name == "abc" and cfg.data.test_subset is None
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0  # int coerced to float
    assert cfg.flat_dict()["loss.lam"] == 0.3
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the dict shipped to Ray workers round-trips


@pytest.mark.parametrize("override, field", [
    ("model=resnet9000", "model"),
    ("batch_size=0", "batch_size"),
    ("data.dataset=mnist", "data.dataset"),
    ("data.source=ftp", "data.source"),
    ("data.train_subset=0", "data.train_subset"),
    ("data.test_subset=-5", "data.test_subset"),
    ("data.loader_workers=-1", "data.loader_workers"),
    ("loss.name=hinge", "loss.name"),
    ("loss.sigma=0", "loss.sigma"),
    ("loss.sigma=-1.0", "loss.sigma"),
    ("loss.sigma=.nan", "loss.sigma"),
    ("loss.k=0", "loss.k"),
    ("loss.lam=-0.1", "loss.lam"),
    ("loss.per_loss=median", "loss.per_loss"),
    ("loss.epsilon=-0.5", "loss.epsilon"),
    ("loss.steps=0", "loss.steps"),
    ("loss.warmup_epochs=-1", "loss.warmup_epochs"),
    ("loss.label_smoothing=1.0", "loss.label_smoothing"),
    ("optim.lr=0", "optim.lr"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("schedule.name=linear", "schedule.name"),
    ("schedule.epochs=0", "schedule.epochs"),
    ("schedule.warmup_epochs=150", "schedule.warmup_epochs"),
    ("schedule.step_size=0", "schedule.step_size"),
    ("schedule.gamma=1.5", "schedule.gamma"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("scaling.num_workers=3", "batch_size"),  # 400 not divisible by 3
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker"),
    ("scaling.gpus_per_worker=0", "scaling.gpus_per_worker"),
    ("run.name=a/b", "run.name"),
    ("run.name=''", "run.name"),
    ("run.experiment=''", "run.experiment"),
    ("run.storage_path=''", "run.storage_path"),
    ("run.max_failures=-2", "run.max_failures"),
    ("run.checkpoints_to_keep=0", "run.checkpoints_to_keep"),
    ("run.seed=-1", "run.seed"),
    ("run.eval_max_batches=0", "run.eval_max_batches"),
    ("run.train_max_batches=0", "run.train_max_batches"),
    ("data.train_subset=100", "data.train_subset"),  # smaller than one global batch (400)
])
def test_bad_field_raises_value_error_naming_it(override, field):
    value = override.split("=", 1)[1]
    with pytest.raises(ValueError) as info:
        load_config(TrainConfig, None, [override])
    message = str(info.value)
    assert message.startswith(f"{field}="), message
    if field == override.split("=", 1)[0] and value not in ("''", ".nan"):
        named = {value}  # the bad value is named too, as typed or as the number it parsed to (-1e-4)
        with contextlib.suppress(ValueError):
            named.add(repr(float(value)))
        assert any(text in message for text in named), message


@pytest.mark.parametrize("data", [
    {"loss": {"name": "adre_adv", "epsilon": 0.0}},
    {"loss": {"name": "smoothadv"}},
])
def test_adversarial_losses_need_a_radius(data):
    with pytest.raises(ValueError, match=r"^loss\.epsilon=0\.0: must be > 0"):
        TrainConfig.from_dict(data)


@pytest.mark.parametrize("data, field", [
    ({"lossy": {}}, "lossy"),
    ({"loss": {"lambda": 0.2}}, "loss.lambda"),
    ({"loss": 3}, "loss"),
    ({"run": {"amp": "yes"}}, "run.amp"),
    ({"loss": {"k": 2.5}}, "loss.k"),
])
def test_unknown_keys_and_wrong_types_rejected(data, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        TrainConfig.from_dict(data)


def test_unknown_override_key_rejected():
    with pytest.raises(ValueError, match=r"^loss\.lambda=0\.2: unknown config key"):
        load_config(TrainConfig, None, ["loss.lambda=0.2"])


def test_shipped_train_configs_exist():
    names = {path.name for path in TRAIN_CONFIGS}
    assert {"train_cifar10_small_cpu.yaml", "train_cifar10_adre_reg.yaml", "train_cifar10_adre_adv.yaml",
            "train_cifar10_basic.yaml", "train_imagenet_adre_reg.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_train_configs_load_and_validate(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.run.name, "shipped configs name their run, so re-running resumes it"
    assert cfg.batch_size % cfg.scaling.num_workers == 0


def test_paper_configs_match_the_papers():
    reg = load_config(TrainConfig, REPO / "jobs/configs/train_cifar10_adre_reg.yaml")
    assert (reg.model, reg.batch_size, reg.schedule.epochs, reg.schedule.name, reg.schedule.step_size,
            reg.schedule.gamma) == ("cifar_resnet110", 400, 150, "step", 50, 0.1)
    assert (reg.loss.name, reg.loss.k, reg.loss.lam, reg.loss.sigma, reg.optim.lr,
            reg.optim.weight_decay) == ("adre_reg", 8, 0.2, 0.25, 0.1, 1e-4)
    imagenet = load_config(TrainConfig, REPO / "jobs/configs/train_imagenet_adre_reg.yaml")
    assert (imagenet.model, imagenet.data.dataset, imagenet.schedule.epochs, imagenet.schedule.name,
            imagenet.schedule.warmup_epochs, imagenet.batch_size, imagenet.loss.lam,
            imagenet.loss.label_smoothing, imagenet.scaling.num_workers) == (
        "resnet50", "imagenet", 50, "cosine", 8, 256, 0.05, 0.1, 4)
    assert imagenet.loss.k == 1 and imagenet.scaling.use_gpu
    assert (imagenet.optim.momentum, imagenet.optim.weight_decay) == (0.875, 1 / 32768)
    k4 = load_config(TrainConfig, REPO / "jobs/configs/train_imagenet_adre_reg_k4.yaml")
    assert (k4.loss.k, k4.batch_size, k4.scaling.num_workers, k4.optim.momentum, k4.optim.weight_decay,
            k4.loss.label_smoothing, k4.schedule.warmup_epochs, k4.schedule.epochs) == (
        4, 64, 4, 0.875, 1 / 32768, 0.1, 8, 50)
    assert k4.optim.lr == imagenet.optim.lr * 64 / 256  # linear scaling with the batch
    adv = load_config(TrainConfig, REPO / "jobs/configs/train_cifar10_adre_adv.yaml")
    assert (adv.loss.name, adv.loss.k, adv.loss.steps, adv.loss.epsilon) == ("adre_adv", 8, 2, 0.5)


def test_imagenet_certify_config_takes_every_100th_val_image():
    from adre_ray.config.certify import CertifyConfig

    cfg = load_config(CertifyConfig, REPO / "jobs/configs/certify_imagenet.yaml")
    assert (cfg.dataset, cfg.split, cfg.skip, cfg.n0, cfg.n, cfg.alpha) == (
        "imagenet", "test", 100, 100, 100_000, 0.001)
