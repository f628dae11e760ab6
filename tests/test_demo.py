"""`adre-ray demo` end to end at toy size: both trainings, both certifications, table, plots, MLflow."""

from __future__ import annotations

import pytest

from adre_ray.config import load_config
from adre_ray.config.demo import DemoConfig
from adre_ray.demo import main


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sigma=-0.5"):
        load_config(DemoConfig, None, ["sigma=-0.5"])
    with pytest.raises(ValueError, match="alpha=1.5"):
        load_config(DemoConfig, None, ["alpha=1.5"])
    with pytest.raises(ValueError, match="tcertify_mode='best'"):
        load_config(DemoConfig, None, ["tcertify_mode=best"])


def test_tiny_demo_writes_table_plots_and_mlflow_runs(ray_cluster, cifar10_dir, tmp_path, monkeypatch,
                                                      capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    code = main(["--output-dir", str(out), "--set", f"data_dir={cifar10_dir}", "--set", "train_subset=128",
                 "--set", "test_subset=64", "--set", "epochs=1", "--set", "batch_size=32",
                 "--set", "num_images=4", "--set", "skip=2500", "--set", "n0=16", "--set", "n=64",
                 "--set", "alpha=0.05", "--set", "cert_batch_size=32",
                 # one training worker and one actor: a process less to start per job on 2 cores (DDP over
                 # 2 workers and 2 actors' shards are tested in test_train_ray / test_certify_ray)
                 "--set", "num_workers=1", "--set", "num_actors=1"])
    printed = capsys.readouterr().out
    assert code == 0
    analysis = out / "analysis"
    table = (analysis / "table.md").read_text()
    for row in ("| ADRE_REG | CERTIFY |", "| ADRE_REG | T-CERTIFY |", "| Basic | CERTIFY |",
                "| Basic | T-CERTIFY |"):
        assert row in table
    for png in ("certified_accuracy.png", "certify_vs_tcertify_ADRE_REG.png",
                "certify_vs_tcertify_Basic.png"):
        assert (analysis / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mlflow ui --backend-store-uri sqlite:///" in printed
    assert printed.count("| ADRE_REG | CERTIFY |") == 1  # the table is printed once
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("adre-demo")
    runs = client.search_runs([experiment.experiment_id])
    jobs = sorted(run.data.tags.get("adre_ray.job", "") for run in runs)
    assert jobs.count("train") == 2 and jobs.count("analyze") == 1 and len(runs) >= 5, jobs
    assert list(tmp_path.iterdir()) == [out]  # nothing written outside the output folder
