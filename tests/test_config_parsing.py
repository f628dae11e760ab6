"""Numbers as people type them parse everywhere (YAML file, --set, flags); bad values are refused by
name before Ray starts (issue 17)."""

from __future__ import annotations

import pytest

from adre_ray.config import load_config
from adre_ray.config.base import MAX_SIGMA
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.demo import DemoConfig
from adre_ray.config.train import TrainConfig
from adre_ray.config.tune import load_space
from adre_ray.distributed import certify as certify_job

SMALL = ["1e-5", "0.00001", "1.0e-5", "1E-5", "1.0E-05", "10e-6"]
LARGE = ["100_000", "100000", "1e5", "1E5", "1.0e+5", "100000.0"]


def _certify_yaml(tmp_path, body: str):
    path = tmp_path / "certify.yaml"
    path.write_text("checkpoint: model.pt\n" + body)
    return path


@pytest.mark.parametrize("text", SMALL)
def test_small_numbers_parse_in_yaml_set_and_flags(tmp_path, text):
    from_yaml = load_config(CertifyConfig, _certify_yaml(tmp_path, f"alpha: {text}\n"))
    from_set = load_config(CertifyConfig, None, ["checkpoint=m.pt", f"alpha={text}"])
    from_flag = certify_job.config_from_args(["--checkpoint", "m.pt", "--alpha", text])
    for cfg in (from_yaml, from_set, from_flag):
        assert isinstance(cfg.alpha, float) and cfg.alpha == pytest.approx(1e-5, rel=1e-12)


@pytest.mark.parametrize("text", LARGE)
def test_large_integers_parse_in_yaml_set_and_flags(tmp_path, text):
    from_yaml = load_config(CertifyConfig, _certify_yaml(tmp_path, f"n: {text}\nshard_size: {text}\n"))
    from_set = load_config(CertifyConfig, None, ["checkpoint=m.pt", f"n={text}"])
    from_flag = certify_job.config_from_args(["--checkpoint", "m.pt", "--n", text])
    for cfg in (from_yaml, from_set, from_flag):
        assert type(cfg.n) is int and cfg.n == 100_000


@pytest.mark.parametrize("small, large", list(zip(SMALL, LARGE, strict=True)))
def test_train_demo_and_tune_configs_parse_them_too(tmp_path, small, large):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: small_cnn\noptim:\n  weight_decay: {small}\ndata:\n  train_subset: {large}\n")
    train = load_config(TrainConfig, path, [f"loss.lam={small}", f"run.seed={large}"])
    assert train.optim.weight_decay == pytest.approx(1e-5) and train.loss.lam == pytest.approx(1e-5)
    assert train.data.train_subset == 100_000 and train.run.seed == 100_000
    demo = load_config(DemoConfig, None, [f"lr={small}", f"n={large}"])
    assert demo.lr == pytest.approx(1e-5) and demo.n == 100_000
    space = tmp_path / "space.yaml"
    space.write_text(f"search:\n  optim.lr: {{loguniform: [{small}, 0.1]}}\n"
                     f"  loss.k: {{randint: [1, {large}]}}\n"
                     f"num_samples: {large}\nvalidation:\n  alpha: {small}\n")
    tune = load_space(space)
    dists = {d.key: d for d in tune.distributions()}
    assert dists["optim.lr"].bounds == (pytest.approx(1e-5), 0.1) and dists["loss.k"].bounds == (1, 100_000)
    assert tune.num_samples == 100_000 and tune.validation.alpha == pytest.approx(1e-5)


def test_bools_and_null_from_text():
    cfg = certify_job.config_from_args(["--checkpoint", "m.pt", "--max-images", "12"])
    assert cfg.max_images == 12
    cfg = load_config(CertifyConfig, None, ["checkpoint=m.pt", "max_images=null", "use_gpu=false",
                                            "sigma=0.5"], values={"amp": "false", "num_actors": "null"})
    assert cfg.max_images is None and cfg.use_gpu is False and cfg.amp is False and cfg.num_actors is None
    cfg = load_config(CertifyConfig, None, values={"checkpoint": "1e5", "grid": "0.5, 1.0"})
    assert cfg.checkpoint == "1e5" and cfg.grid == (0.5, 1.0)  # a path stays text


BAD_CERTIFY = [
    (["--sigma", "1e308"], "sigma"),
    (["--set", "sigma=1.0e+308"], "sigma"),
    (["--sigma", f"{MAX_SIGMA * 1.01}"], "sigma"),
    (["--sigma", "inf"], "sigma"),
    (["--sigma", "nan"], "sigma"),
    (["--sigma", "-0.25"], "sigma"),
    (["--sigma", "0"], "sigma"),
    (["--alpha", "0"], "alpha"),
    (["--alpha", "1"], "alpha"),
    (["--alpha", "1e5"], "alpha"),
    (["--alpha", "one"], "alpha"),
    (["--n", "0"], "n"),
    (["--n", "2.5"], "n"),
    (["--n", "1e30"], "n"),
    (["--n0", "abc"], "n0"),
    (["--set", "n0=1e400"], "n0"),
    (["--grid", "0.5,1.5"], "grid"),
    (["--grid", "0.5,x"], "grid"),
    (["--max-images", "-1"], "max_images"),
    (["--seed", "-3"], "seed"),
    (["--set", "use_gpu=maybe"], "use_gpu"),
    (["--set", "flush_seconds=.inf"], "flush_seconds"),
    (["--set", "amp=yes please"], "amp"),
    (["--mode", "greedy"], "tcertify_mode"),
    (["--set", "sigmaa=0.5"], "sigmaa"),
]


@pytest.mark.parametrize("argv, field", BAD_CERTIFY, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_certify_values_refused_by_name_before_ray(monkeypatch, capsys, argv, field):
    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started for a bad config")

    monkeypatch.setattr(certify_job, "connect_ray", no_ray)
    assert certify_job.main(["--checkpoint", "m.pt", *argv]) == 2
    err = capsys.readouterr().err
    assert f"error: {field}=" in err, err
    if argv == ["--grid", "0.5,x"]:
        assert f"error: grid={argv[1]!r}" in err, err  # the whole value as typed, not one element


@pytest.mark.parametrize("override, field", [
    ("loss.sigma=1e308", "loss.sigma"),
    ("loss.sigma=1e-5x", "loss.sigma"),
    ("optim.lr=.inf", "optim.lr"),
    ("schedule.epochs=1e100", "schedule.epochs"),
    ("loss.k=2.5", "loss.k"),
    ("run.amp=maybe", "run.amp"),
])
def test_bad_train_values_refused_by_name(override, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        load_config(TrainConfig, None, [override])


@pytest.mark.parametrize("override, field", [
    ("sigma=1e308", "sigma"), ("alpha=1", "alpha"), ("lr=-1e-5", "lr"), ("n=1e30", "n"),
])
def test_bad_demo_values_refused_by_name(override, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        load_config(DemoConfig, None, [override])


def test_unknown_keys_are_named_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"^alhpa=0\.1: unknown config key \(known in this section: .*alpha"):
        load_config(CertifyConfig, _certify_yaml(tmp_path, "alhpa: 0.1\n"))
    with pytest.raises(ValueError, match=r"^optim\.learning_rate=0\.1: unknown config key .*lr"):
        TrainConfig.from_dict({"optim": {"learning_rate": 0.1}})
