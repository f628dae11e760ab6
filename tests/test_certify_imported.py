"""Certification of models from elsewhere, end to end on Ray: an imported randomized-smoothing checkpoint
(with a sigma other than its training sigma: warned and both recorded) and a ``--model-fn`` callable."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from adre_ray.analysis.results import SCHEMA_VERSION, read_manifest, read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.distributed.certify import main, resolve_settings, run_certification
from adre_ray.models import save_model_checkpoint
from adre_ray.models.importers import import_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_fns  # noqa: E402
from test_import_checkpoint import original_cifar, save_original  # noqa: E402


def cfg_for(data_dir: Path, out: Path, **changes) -> CertifyConfig:
    settings = dict(dataset="cifar10", data_dir=str(data_dir), split="test", n0=32, n=256, alpha=0.001,
                    start=0, skip=5_000, max_images=2, tcertify_mode="pilot", shard_size=128,
                    batch_size=128, num_actors=1, seed=5, output_dir=str(out), tracking_uri="none",
                    progress=False)
    settings.update(changes)
    cfg = CertifyConfig(**settings)
    cfg.validate()
    return cfg


def test_imported_checkpoint_certifies_and_records_both_sigmas(ray_cluster, cifar10_dir, tmp_path):
    src = save_original(tmp_path / "checkpoint.pth.tar", original_cifar(), "cifar_resnet20")
    dst = import_checkpoint(src, tmp_path / "imported.pt", source_format="smoothing", dataset="cifar10",
                            sigma=0.25)
    cfg = cfg_for(cifar10_dir, tmp_path / "out", checkpoint=str(dst), sigma=0.5)
    with pytest.warns(UserWarning, match=r"sigma=0.5 differs from the sigma=0.25"):
        result = run_certification(cfg)
    rows = read_results(result.output_dir).to_pylist()
    assert [r["idx"] for r in rows] == [0, 5_000]
    for row in rows:
        assert row["sigma"] == 0.5 and row["train_sigma"] == 0.25 and row["schema_version"] == SCHEMA_VERSION
        assert row["checkpoint"] == str(dst.resolve())
        assert sum(row["counts"]) == 256 and sum(row["pilot_counts"]) == 32
    # sigma left null: the recorded training sigma, and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved, _ = resolve_settings(cfg_for(cifar10_dir, tmp_path / "out2", checkpoint=str(dst)))
    assert resolved.sigma == 0.25


def test_model_fn_gives_the_rows_of_the_same_model_as_a_checkpoint(ray_cluster, cifar10_dir, tmp_path):
    ckpt = save_model_checkpoint(tmp_path / "m.pt", model_fns.seeded_small_cnn(), model_name="small_cnn",
                                 num_classes=10, dataset="cifar10")
    from_ckpt = run_certification(cfg_for(cifar10_dir, tmp_path / "ckpt", checkpoint=str(ckpt), sigma=0.25))
    spec = "tests.model_fns:seeded_small_cnn"  # Ray puts the driver's working directory on the actors' path
    code = main(["--model-fn", spec, "--sigma", "0.25", "--dataset", "cifar10", "--data-dir",
                 str(cifar10_dir), "--n0", "32", "--n", "256", "--skip", "5000", "--max-images", "2",
                 "--mode", "pilot", "--shard-size", "128", "--batch-size", "128", "--actors", "1",
                 "--seed", "5", "--output-dir", str(tmp_path / "fn"), "--tracking-uri", "none",
                 "--no-progress"])
    assert code == 0
    ours, theirs = read_results(tmp_path / "fn").to_pylist(), read_results(from_ckpt.output_dir).to_pylist()
    assert [r["counts"] for r in ours] == [r["counts"] for r in theirs]
    assert [r["radius_tcertify"] for r in ours] == [r["radius_tcertify"] for r in theirs]
    assert {r["checkpoint"] for r in ours} == {f"model_fn:{spec}"}
    assert all(r["train_sigma"] is None for r in ours)
    assert read_manifest(tmp_path / "fn")["checkpoint"] == f"model_fn:{spec}"


def test_model_fn_bad_input(tmp_path, capsys):
    assert main(["--model-fn", "not a spec", "--sigma", "0.25", "--tracking-uri", "none"]) == 2
    assert "model_fn='not a spec': expected 'package.module:function'" in capsys.readouterr().err
    assert main(["--model-fn", "model_fns:seeded_small_cnn", "--checkpoint", "x.pt", "--sigma", "0.25"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["--model-fn", "model_fns:seeded_small_cnn"]) == 2
    assert "must be set with model_fn" in capsys.readouterr().err
    from adre_ray.models.model_fn import build_model_fn
    with pytest.raises(ValueError, match=r"returned str, not a torch.nn.Module"):
        build_model_fn("model_fns:not_a_module")
    with pytest.raises(ValueError, match=r"has no attribute 'nope'"):
        build_model_fn("model_fns:nope")
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_xyz'"):
        build_model_fn("no_such_module_xyz:f")
    model = build_model_fn("model_fns:denoised_small_cnn")
    assert not model.training and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
