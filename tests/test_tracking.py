"""MLflow tracking helpers: URI resolution, runs (new, nested, resumed), params, metrics, artifacts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adre_ray.config import JobConfig
from adre_ray.tracking import (
    DISABLED,
    get_or_create_experiment,
    log_artifact,
    log_config,
    log_metrics,
    mlflow_run,
    resolve_tracking_uri,
    tracking_enabled,
)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_resolve_prefers_explicit_then_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////abs/env.db")
    assert resolve_tracking_uri() == "sqlite:////abs/env.db"
    assert resolve_tracking_uri("sqlite:////abs/explicit.db") == "sqlite:////abs/explicit.db"


def test_resolve_makes_relative_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path.resolve() / 'sub/x.db'}"
    assert resolve_tracking_uri("mlruns") == (tmp_path.resolve() / "mlruns").as_uri()
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


@pytest.mark.parametrize("text", ["none", "NONE", "off", "disabled"])
def test_disabled_tracking_is_a_no_op(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(text) == DISABLED
    assert not tracking_enabled(text)
    with mlflow_run("exp", "r", tracking_uri=text) as run:
        assert run.info.run_id == ""
        assert log_metrics({"a": 1.0}, step=0, tracking_uri=text) == {}
    assert not list(tmp_path.iterdir())  # nothing written


@dataclasses.dataclass
class _Inner:
    lam: float = 0.1
    grid: tuple[float, ...] = (0.5, 1.0)


@dataclasses.dataclass
class _Cfg(JobConfig):
    name: str = "x" * 7000
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    note: str | None = None
    many: int = 0


def test_run_params_metrics_and_artifacts(mlflow_uri, tmp_path):
    with mlflow_run("exp-a", "first", tags={"job": "train"}) as run:
        run_id = run.info.run_id
        logged = log_config(_Cfg())
        logged_metrics = log_metrics({"loss": 1.5, "acc": np.float32(0.25), "t": torch.tensor(3.0),
                                      "nan": math.nan, "inf": math.inf, "s": "text", "flag": True,
                                      "vec": np.zeros(2)}, step=2)
        (tmp_path / "model.pt").write_bytes(b"abc")
        log_artifact(tmp_path / "model.pt", "checkpoint")
    assert set(logged) == {"name", "inner.lam", "inner.grid", "note", "many"}
    assert set(logged_metrics) == {"loss", "acc", "t"}
    run = _client(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["job"] == "train"
    assert run.info.run_name == "first"
    params = run.data.params
    assert params["inner.lam"] == "0.1" and params["inner.grid"] == "[0.5, 1.0]" and params["note"] == "None"
    assert len(params["name"]) == 6000 and params["name"].endswith("...")
    assert run.data.metrics == {"loss": 1.5, "acc": 0.25, "t": 3.0}
    history = _client(mlflow_uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.5)]
    artifacts = [a.path for a in _client(mlflow_uri).list_artifacts(run_id, "checkpoint")]
    assert artifacts == ["checkpoint/model.pt"]
    # artifacts live beside the SQLite file, not in the working directory
    db_dir = Path(mlflow_uri[len("sqlite:///"):]).parent
    assert list((db_dir / "mlartifacts").rglob("model.pt"))


def test_many_params_are_batched(mlflow_uri):
    flat = {f"p{i:03d}": i for i in range(250)}  # > 100 params per MLflow batch
    with mlflow_run("exp-b") as run:
        log_config(flat)
    assert len(_client(mlflow_uri).get_run(run.info.run_id).data.params) == 250


def test_resume_and_log_from_elsewhere_by_run_id(mlflow_uri):
    with mlflow_run("exp-c", "r") as run:
        run_id = run.info.run_id
        log_config({"a": 1})
    # a worker logs into a run by id without an active run, and without changing its status
    log_metrics({"epoch_loss": 0.5}, step=0, run_id=run_id)
    assert _client(mlflow_uri).get_run(run_id).info.status == "FINISHED"
    with mlflow_run("exp-c", run_id=run_id) as resumed:
        assert resumed.info.run_id == run_id
        assert _client(mlflow_uri).get_run(run_id).info.status == "RUNNING"
        assert log_config({"a": 2, "b": 3}) == {"b": "3"}  # existing params are immutable: kept
        log_metrics({"epoch_loss": 0.25}, step=1)
    history = _client(mlflow_uri).get_metric_history(run_id, "epoch_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.25)]
    resumed_run = _client(mlflow_uri).get_run(run_id)
    assert resumed_run.data.params == {"a": "1", "b": "3"}
    assert resumed_run.data.tags["changed_param.a"] == "2"


def test_nested_child_with_parent_not_active_here(mlflow_uri):
    with mlflow_run("exp-d", "parent") as parent:
        parent_id = parent.info.run_id
    with mlflow_run("exp-d", "child", parent_run_id=parent_id) as child:
        child_id = child.info.run_id
    with mlflow_run("exp-d", "parent2") as parent2, mlflow_run("exp-d", "child2",
                                                              parent_run_id=parent_id) as child2:
        assert parent2.info.run_id != child2.info.run_id
    client = _client(mlflow_uri)
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_run(child2.info.run_id).data.tags["mlflow.parentRunId"] == parent_id


def test_failed_block_marks_run_failed(mlflow_uri):
    with pytest.raises(RuntimeError), mlflow_run("exp-e") as run:
        raise RuntimeError("boom")
    assert _client(mlflow_uri).get_run(run.info.run_id).info.status == "FAILED"


def test_experiment_creation_is_idempotent_and_validated(mlflow_uri):
    first = get_or_create_experiment("exp-f")
    assert get_or_create_experiment("exp-f") == first
    with pytest.raises(ValueError, match="experiment=''"):
        get_or_create_experiment("")


def test_log_without_active_run_names_run_id(mlflow_uri):
    with pytest.raises(ValueError, match="run_id=None"):
        log_metrics({"a": 1.0})
    with pytest.raises(ValueError, match="path="):
        log_artifact("/nonexistent/file", run_id="abc")
