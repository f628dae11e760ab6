"""Shared fixtures: one local Ray cluster for the whole session, paths to the shared CIFAR-10 data."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = Path(os.environ.get("ADRE_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


def cifar10_missing() -> str | None:
    """Why the shared CIFAR-10 Parquet cannot be used here (None when it can)."""
    if (SHARED_CIFAR10 / "test.parquet").is_file():
        return None
    return f"CIFAR-10 Parquet not found at {SHARED_CIFAR10} (set ADRE_CIFAR10_DIR)"


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The full CIFAR-10 as Parquet (``../shared/data/cifar10``); tests never download."""
    reason = cifar10_missing()
    if reason is not None:
        pytest.skip(reason)
    return SHARED_CIFAR10


@pytest.fixture(scope="session")
def node_credentials_file(tmp_path_factory) -> Path:
    """The AWS credentials file of the tests' Ray node (``AWS_SHARED_CREDENTIALS_FILE`` of its workers),
    as ``~/.aws/credentials`` is a real node's: keys are never passed to Ray, workers read them here."""
    return tmp_path_factory.getbasetemp() / "node_aws_credentials"


@pytest.fixture(scope="session")
def ray_cluster(node_credentials_file):
    """One local Ray cluster (2 CPUs) shared by every test that needs Ray: always a new one of the tests'
    own (``address="local"``), never a cluster started on the machine with ``ray start``. Its dashboard
    runs, as on a real cluster: Ray Train's ``PlacementGroupCleaner`` asks it (the State API) whether a
    training controller is still alive, and without it the placement group of a controller that died
    with its Tune trial is never removed, holding its CPUs until every later training waits forever."""
    import ray

    from adre_ray.distributed._common import start_private_ray

    if not ray.is_initialized():
        env = {"OMP_NUM_THREADS": "1", "AWS_SHARED_CREDENTIALS_FILE": str(node_credentials_file),
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one actor less per run: no spot nodes here
               # Ray Train's controller sees a report, a checkpoint or the end of a run only at its next
               # poll of the workers (every 2 s by default); a missed poll is not a failure (that takes
               # RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes), so polling faster is safe here
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        start_private_ray(num_cpus=2, include_dashboard=True, log_to_driver=False,
                          runtime_env={"env_vars": env})
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


@pytest.fixture(scope="module")
def s3_endpoint(node_credentials_file):
    """A local S3 server (moto's server mode on 127.0.0.1, a free port) for a module, bucket ``adre-test``
    made; the driver's AWS_* variables point at it and the Ray node's credentials file holds its keys."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    from adre_ray.distributed._common import free_local_port

    port = free_local_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    write_node_credentials(node_credentials_file, keys)
    patch = pytest.MonkeyPatch()
    for name, value in {**keys, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        patch.setenv(name, value)
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(S3_BUCKET)
    yield endpoint
    patch.undo()
    server.stop()


S3_BUCKET = "adre-test"


def write_node_credentials(path: Path, keys: dict[str, str]) -> None:
    """``[default]`` profile of an AWS credentials file with these ``AWS_*`` keys (owner-only)."""
    lines = ["[default]"] + [f"{name.lower()} = {value}" for name, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


@functools.cache
def _empty_mlflow_db() -> Path:
    """One new SQLite MLflow store, made (and migrated) once per test process."""
    import tempfile

    from mlflow.tracking import MlflowClient

    template = Path(tempfile.mkdtemp(prefix="adre-mlflow-template-")) / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    return template


def fresh_mlflow_db(path: Path) -> str:
    """The URI of a new, empty SQLite MLflow store at ``path``: a copy of ``_empty_mlflow_db()``, as
    MLflow's ~30 schema migrations take seconds per new file on this machine."""
    shutil.copyfile(_empty_mlflow_db(), path)
    return f"sqlite:///{path}"


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh local SQLite MLflow store per test (embedded, no server)."""
    uri = fresh_mlflow_db(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def pytest_collection_modifyitems(config, items) -> None:
    """Start the tests that run as subprocesses beside the rest of the suite (``tests/background.py``)."""
    from background import start_selected

    if not config.option.collectonly:
        start_selected(config, items)


def pytest_unconfigure(config) -> None:
    """Stop those subprocesses if the suite ended before their tests collected them."""
    from background import stop_all

    stop_all(config)
