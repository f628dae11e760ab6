"""``adre-ray tune``: a real 2-trial Ray Tune search (Ray Train trials, ASHA, certified validation, MLflow
parent + child runs), plus the space -> Tune / trial-config helpers."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from background import IN_BACKGROUND, background_pytest, check, runs_beside_the_suite
from conftest import fresh_mlflow_db

from adre_ray.config import load_config
from adre_ray.config.train import TrainConfig
from adre_ray.config.tune import TuneSpace, load_space
from adre_ray.distributed.tune import (
    BEST_CONFIG_FILENAME,
    TRIAL_ID_TAG,
    TRIALS_FILENAME,
    check_space_against,
    main,
    param_space,
    trial_base_config,
    trial_overrides,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_CPU_CONFIG = REPO / "jobs" / "configs" / "train_cifar10_small_cpu.yaml"
TINY_SPACE = REPO / "tune_spaces" / "tiny_cpu.yaml"


def _base() -> TrainConfig:
    return load_config(TrainConfig, SMALL_CPU_CONFIG)


def test_param_space_maps_each_distribution_to_tune() -> None:
    from ray import tune

    space = TuneSpace.from_dict({"search": {
        "loss.lam": {"grid": [0.1, 0.2]}, "loss.k": {"choice": [2, 4]},
        "optim.lr": {"loguniform": [0.01, 0.1]}, "loss.sigma": {"uniform": [0.2, 0.3]},
        "loss.steps": {"randint": [1, 4]}}})
    params = param_space(space)
    assert params["loss.lam"] == tune.grid_search([0.1, 0.2])
    assert isinstance(params["loss.k"], tune.search.sample.Categorical)
    assert params["loss.k"].categories == [2, 4]
    assert isinstance(params["optim.lr"].get_sampler(), tune.search.sample.Float._LogUniform)
    assert (params["optim.lr"].lower, params["optim.lr"].upper) == (0.01, 0.1)
    assert (params["loss.sigma"].lower, params["loss.sigma"].upper) == (0.2, 0.3)
    assert (params["loss.steps"].lower, params["loss.steps"].upper) == (1, 4)


def test_scale_by_multiplies_with_the_trial_value() -> None:
    space = load_space(REPO / "tune_spaces" / "adre_adv_imagenet.yaml")
    dists = space.distributions()
    base = _base()
    out = trial_overrides({"loss.sigma": 0.5, "loss.lam": 0.1, "loss.epsilon": 2.0}, dists, base)
    assert out == {"loss.sigma": 0.5, "loss.lam": 0.1, "loss.epsilon": 1.0}
    # scaled by a key that is not searched: the base config's value (0.25 in the small CPU config)
    space = TuneSpace.from_dict({"search": {"loss.epsilon": {"grid": [2.0], "scale_by": "loss.sigma"}}})
    assert trial_overrides({"loss.epsilon": 2.0}, space.distributions(), base) == {"loss.epsilon": 0.5}


def test_trial_base_config_applies_space_then_command_line() -> None:
    space = load_space(TINY_SPACE)
    cfg = trial_base_config(_base(), space, {"schedule.epochs": 2})
    assert (cfg.model, cfg.data.train_subset, cfg.scaling.num_workers) == ("small_cnn", 128, 1)
    assert cfg.schedule.epochs == 2  # --set wins over the space's overrides
    assert cfg.validation.enabled and (cfg.validation.n0, cfg.validation.n) == (8, 64)
    with pytest.raises(ValueError, match=r"--set loss.lam=0.5: this key is searched"):
        trial_base_config(_base(), space, {"loss.lam": 0.5})


@pytest.mark.parametrize(("change", "named"), [
    ({"search": {"loss.sigma": {"grid": [0.25, -1.0]}}}, "search.loss.sigma: value -1.0"),
    ({"search": {"loss.k": {"randint": [0, 3]}}}, "search.loss.k: value 0"),
    ({"metric": "approx_cert_acc_at_0.33"}, "metric='approx_cert_acc_at_0.33'"),
    ({"scheduler": {"metric": "approx_acr"}}, "scheduler.metric='approx_acr'"),
    ({"scheduler": {"max_t": 3}}, "scheduler.max_t=3"),
])
def test_space_values_are_checked_against_the_train_config(change: dict, named: str) -> None:
    data = {"search": {"loss.lam": {"grid": [0.1]}}, **change}
    space = TuneSpace.from_dict(data)
    base = trial_base_config(_base(), space)  # 6 epochs
    with pytest.raises(ValueError) as info:
        check_space_against(space, base)
    assert str(info.value).startswith(named), str(info.value)


def test_command_line_rejects_a_bad_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"search": {"loss.lamda": {"grid": [0.1]}}}))
    assert main(["--space", str(path), "--config", str(SMALL_CPU_CONFIG)]) == 2
    assert "search.loss.lamda=" in capsys.readouterr().err


TUNE_SEARCHES = background_pytest(
    "tests/test_tune.py::test_tune_searches_beside_the_suite",
    ["tests/test_tune.py::test_two_trial_search_runs_to_the_end",
     "tests/test_tune.py::test_tune_killed_after_its_first_trial_resumes_with_tunes_restore"], timeout_s=1000)


@pytest.mark.slow
@pytest.mark.timeout(1100)
@pytest.mark.skipif(IN_BACKGROUND, reason="the collector of the searches run beside the suite")
def test_tune_searches_beside_the_suite(request) -> None:
    """The two searches below run in a pytest of their own beside the rest of the suite (most of a
    search's time is Ray processes starting one after another, with a core idle)."""
    check(request, TUNE_SEARCHES)


@runs_beside_the_suite
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_trial_search_runs_to_the_end(ray_cluster, cifar10_dir: Path, mlflow_uri: str,
                                          tmp_path: Path) -> None:
    """tiny_cpu.yaml: lambda in {0.0, 0.2}, small_cnn, 1 epoch on 128 images, validation on 32 held-out
    images with n0 = 8, n = 64; both trials at once on the 2-CPU test cluster."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    rc = main(["--space", str(TINY_SPACE), "--config", str(SMALL_CPU_CONFIG), "--output-dir", str(out),
               "--set", f"data.data_dir={cifar10_dir}"])
    assert rc == 0
    folder = out / "tiny_cpu"

    # both trials trained to the end and reported the objective from their final epoch
    with (folder / TRIALS_FILENAME).open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(float(r["loss.lam"]) for r in rows) == [0.0, 0.2]
    for row in rows:
        assert row["status"] == "COMPLETED" and row["epochs"] == "1", row
        assert 0.0 <= float(row["approx_cert_acc_at_0.00"]) <= 1.0
        assert 0.0 <= float(row["approx_tcert_acc_at_0.25"]) <= 1.0
        assert math.isfinite(float(row["approx_acr"])) and float(row["approx_acr"]) >= 0
        assert float(row["approx_num_images"]) == 32
        assert 0.0 <= float(row["test_acc_noise"]) <= 1.0

    # the two trials ran at the same time (1 CPU worker each on the 2-CPU cluster)
    spans = [(float(r["finished_at"]) - float(r["time_total_s"]), float(r["finished_at"])) for r in rows]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans

    # the best config is the argmax of the objective and is a loadable TrainConfig
    best_row = max(rows, key=lambda r: float(r["approx_acr"]))
    best_cfg = load_config(TrainConfig, folder / BEST_CONFIG_FILENAME)
    assert best_cfg.loss.lam == float(best_row["loss.lam"])
    assert (best_cfg.model, best_cfg.data.train_subset, best_cfg.schedule.epochs) == ("small_cnn", 128, 1)

    # MLflow: one parent run, two finished child runs with the trial's params and metrics
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("adre-tune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("adre_ray.job") == "tune"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert sorted(float(c.data.params["loss.lam"]) for c in children) == [0.0, 0.2]
    by_trial = {row["trial_id"]: row for row in rows}
    for child in children:
        assert child.info.status == "FINISHED"
        row = by_trial[child.data.tags[TRIAL_ID_TAG]]
        assert child.data.metrics["approx_acr"] == pytest.approx(float(row["approx_acr"]))
        assert "test_acc_noise" in child.data.metrics and child.data.params["model"] == "small_cnn"
    assert parent.data.metrics["best_approx_acr"] == pytest.approx(float(best_row["approx_acr"]))
    assert parent.data.tags["best_trial_id"] == best_row["trial_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {TRIALS_FILENAME, BEST_CONFIG_FILENAME} <= artifacts


@runs_beside_the_suite
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_killed_after_its_first_trial_resumes_with_tunes_restore(ray_cluster, cifar10_dir, tmp_path,
                                                                      capsys, monkeypatch):
    """Issue 16. Kept last in the suite: a search run in-process can leave a trial's placement group on
    the shared cluster for a while. Before: a re-run started over (both trials again) and left the old
    parent and child runs RUNNING; ``--set run.tracking_uri`` was ignored (runs went to ./mlflow.db)."""
    import json
    import signal

    from mlflow.tracking import MlflowClient


    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = fresh_mlflow_db(tmp_path / "tune.db")
    out = tmp_path / "out"
    args = ["--space", str(REPO / "tune_spaces" / "tiny_cpu.yaml"),
            "--config", str(REPO / "jobs" / "configs" / "train_cifar10_small_cpu.yaml"),
            "--output-dir", str(out), "--max-concurrent", "1",
            "--set", f"data.data_dir={cifar10_dir}", "--set", f"run.tracking_uri={uri}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI="",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="r16", dir="/tmp"))  # its own Ray, not the test cluster
    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, "-m", "adre_ray.cli", "tune", *args, "--address", "local"],
                             cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        tune_dir = out / "tiny_cpu" / "tune"
        while not any("approx_acr" in p.read_text() for p in tune_dir.rglob("result.json")):
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the first trial did not finish"
            time.sleep(1.0)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        first.wait()
    killed_at = time.time()
    reports = [json.loads(line) for p in tune_dir.rglob("result.json") for line in p.read_text().splitlines()
               if "approx_acr" in line]
    done_before = {r["trial_id"] for r in reports}
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("adre-tune") is not None  # the search's own store, not ./mlflow.db

    assert main(args) == 0
    assert "resuming search 'tiny_cpu'" in capsys.readouterr().out
    with (out / "tiny_cpu" / TRIALS_FILENAME).open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(float(r["loss.lam"]) for r in rows) == [0.0, 0.2]
    assert all(r["status"] == "COMPLETED" for r in rows), rows
    for row in rows:  # the trial finished before the kill was kept, not trained again
        assert (float(row["finished_at"]) < killed_at) == (row["trial_id"] in done_before), (row, done_before)
    runs = client.search_runs([client.get_experiment_by_name("adre-tune").experiment_id])
    parents = [r for r in runs if r.data.tags.get("adre_ray.job") == "tune"]
    children = [r for r in runs if r.data.tags.get("adre_ray.job") == "tune-trial"]
    assert len(parents) == 1 and len(children) == 2, [(r.info.run_name, r.info.status) for r in runs]
    assert {c.data.tags[TRIAL_ID_TAG] for c in children} == {r["trial_id"] for r in rows}
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert not (cwd / "mlflow.db").exists()
