"""Shared fixtures: one local Ray cluster for the whole session, paths to the shared CIFAR-10 data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = Path(os.environ.get("ADRE_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The full CIFAR-10 as Parquet (``../shared/data/cifar10``); tests never download."""
    if not (SHARED_CIFAR10 / "test.parquet").is_file():
        pytest.skip(f"CIFAR-10 Parquet not found at {SHARED_CIFAR10} (set ADRE_CIFAR10_DIR)")
    return SHARED_CIFAR10


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no dashboard) shared by every test that needs Ray: always a new one
    of the tests' own (``address="local"``), never a cluster started on the machine with ``ray start``."""
    import ray

    from adre_ray.distributed._common import start_private_ray

    if not ray.is_initialized():
        start_private_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,
                          runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture()
def idle_ray_cluster(ray_cluster):
    """The shared cluster once all its CPUs are free: Ray Data's read tasks need a whole CPU of the two,
    and an earlier test's killed actors or finished trials free theirs a little after the test ends."""
    import time

    deadline = time.monotonic() + 60.0
    total = ray_cluster.cluster_resources().get("CPU", 0)
    while ray_cluster.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, f"CPUs still held after 60 s: {ray_cluster.available_resources()}"
        time.sleep(0.5)
    return ray_cluster


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh local SQLite MLflow store per test (embedded, no server)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
