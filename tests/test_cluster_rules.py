"""Cluster rules without a cluster: which paths a job spanning nodes refuses, what the certification pool
asks an autoscaler for and how long it waits, the GPU-worker and per-worker batch refusals, and the
``ray job submit`` upload excludes. The multi-node runs are in ``tests/cluster_cases.py``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from adre_ray.config import load_config
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.train import TrainConfig
from adre_ray.distributed import certify_pool as certify_job  # the pool and its cluster rules
from adre_ray.distributed import train as train_job
from adre_ray.distributed.cluster import ClusterFacts, check_cluster_paths

REPO = Path(__file__).resolve().parents[1]

ONE_NODE = ClusterFacts(nodes=1, total={"CPU": 2}, free={"CPU": 2}, max_resources=None)
TWO_NODES = ClusterFacts(nodes=2, total={"CPU": 2}, free={"CPU": 2}, max_resources=None)
# cluster.yaml fresh: the head only (CPU 0), an autoscaler that can add 8 x 8 GPUs
AUTOSCALED = ClusterFacts(nodes=1, total={"CPU": 0}, free={"CPU": 0},
                          max_resources={"CPU": 1536 + 512, "GPU": 64}, autoscaling=True)


# ----------------------------------------------------------------------------------------- path refusals


@pytest.mark.parametrize("facts", [TWO_NODES, AUTOSCALED], ids=["two_nodes", "autoscaler"])
@pytest.mark.parametrize("path", ["runs", "/abs/runs", "file:///abs/runs", "sqlite:///x/mlflow.db"])
def test_local_paths_are_refused_when_a_job_can_span_nodes(facts, path):
    with pytest.raises(ValueError, match=rf"^run.storage_path='{path}': a local path on a cluster that spans "
                                         r"nodes .*run.shared_filesystem=true"):
        check_cluster_paths({"run.storage_path": path}, facts, shared_filesystem=False,
                            flag="run.shared_filesystem=true")


@pytest.mark.parametrize("facts,shared", [(ONE_NODE, False), (TWO_NODES, True), (AUTOSCALED, True)])
def test_local_paths_pass_on_one_node_or_a_declared_shared_filesystem(facts, shared):
    check_cluster_paths({"run.storage_path": "runs", "data.data_dir": "data/cifar10"}, facts,
                        shared_filesystem=shared, flag="x")


def test_uris_and_servers_pass_on_a_cluster():
    check_cluster_paths({"run.storage_path": "s3://b/runs", "data.data_dir": "gs://b/data",
                         "run.tracking_uri": "http://mlflow:5000", "checkpoint": None}, TWO_NODES,
                        shared_filesystem=False, flag="x")


def test_train_refuses_the_default_sqlite_store_on_a_cluster(monkeypatch):
    """Workers log epochs to MLflow: the default SQLite file would be a different file on every node."""
    monkeypatch.setattr(train_job, "cluster_facts", lambda: TWO_NODES)
    cfg = load_config(TrainConfig, None, ["run.storage_path=s3://b/runs", "data.data_dir=s3://b/cifar10",
                                          "data.loader=ray_data"])
    with pytest.raises(ValueError, match=r"^run.tracking_uri='sqlite:///.*mlflow.db': a local path .* use an "
                                         r"MLflow server"):
        train_job.check_train_paths(cfg, "sqlite:////work/mlflow.db")
    train_job.check_train_paths(cfg, "none")
    train_job.check_train_paths(cfg.replace(**{"run.shared_filesystem": True}), "sqlite:////nfs/mlflow.db")


def test_certify_refuses_a_local_checkpoint_when_actors_can_be_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(certify_job, "cluster_facts", lambda: AUTOSCALED)
    monkeypatch.setattr(certify_job, "_ensure_ray", lambda: None)
    cfg = CertifyConfig(checkpoint=str(tmp_path / "model.pt"), sigma=0.25)
    with pytest.raises(ValueError, match=r"^checkpoint=.*an autoscaler that can add nodes.*"
                                         r"--shared-filesystem"):
        certify_job.check_certify_paths(cfg)
    certify_job.check_certify_paths(CertifyConfig(checkpoint="s3://b/model.pt", sigma=0.25))
    certify_job.check_certify_paths(CertifyConfig(checkpoint=str(tmp_path / "m.pt"), sigma=0.25,
                                                  shared_filesystem=True))


# ------------------------------------------------------------------------------------ autoscaler requests


def test_use_gpu_null_picks_gpus_the_autoscaler_can_add():
    """Before: a fresh cluster.yaml cluster has no GPU yet, so null picked CPU actors on the CPU: 0 head."""
    assert certify_job.choose_use_gpu(CertifyConfig(checkpoint="s3://b/m.pt"), AUTOSCALED) is True
    assert certify_job.choose_use_gpu(CertifyConfig(checkpoint="s3://b/m.pt"), ONE_NODE) is False
    cpu_only = CertifyConfig(checkpoint="s3://b/m.pt", use_gpu=False)
    assert certify_job.choose_use_gpu(cpu_only, AUTOSCALED) is False


def _fake_autoscaler(monkeypatch, arrive: ClusterFacts) -> list:
    asked: list = []
    monkeypatch.setattr(certify_job, "ask_autoscaler", asked.append)
    waits: list = []

    def wait_for(key, wanted, wait_s, **kwargs):
        waits.append((key, wanted, wait_s))
        return arrive

    monkeypatch.setattr(certify_job, "wait_for", wait_for)
    return asked, waits


def test_pool_asks_the_autoscaler_for_its_target_and_starts_with_what_arrived(monkeypatch):
    arrived = ClusterFacts(nodes=2, total={"CPU": 192, "GPU": 8}, free={"CPU": 192, "GPU": 8},
                           max_resources=AUTOSCALED.max_resources, autoscaling=True)
    asked, waits = _fake_autoscaler(monkeypatch, arrived)
    cfg = CertifyConfig(checkpoint="s3://b/m.pt", autoscale_wait_s=900)
    assert certify_job.pool_plan(cfg, True, AUTOSCALED) == (8, 64)  # 8 now, grows to 64
    assert asked == [[{"CPU": 1.0, "GPU": 1.0}] * 64] and waits == [("GPU", 1, 900)]


def test_pool_refuses_more_actors_than_the_autoscaler_can_bring_at_once(monkeypatch):
    asked, waits = _fake_autoscaler(monkeypatch, AUTOSCALED)
    with pytest.raises(ValueError, match=r"^num_actors=65: the cluster's autoscaler can bring at most "
                                         r"64 GPUs"):
        certify_job.pool_plan(CertifyConfig(checkpoint="s3://b/m.pt", num_actors=65), True, AUTOSCALED)
    assert asked == [] and waits == []  # nothing asked, nothing waited for


def test_pool_gives_up_after_autoscale_wait_s_and_withdraws_its_request(monkeypatch):
    asked, waits = _fake_autoscaler(monkeypatch, AUTOSCALED)  # no node ever arrives
    with pytest.raises(ValueError, match=r"no free GPU came up within autoscale_wait_s=5 s \(the autoscaler "
                                         r"was asked for 4\)"):
        certify_job.pool_plan(CertifyConfig(checkpoint="s3://b/m.pt", num_actors=4, autoscale_wait_s=5),
                              True, AUTOSCALED)
    assert asked == [[{"CPU": 1.0, "GPU": 1.0}] * 4, []]


def test_wait_for_prints_a_progress_line_each_minute(monkeypatch, capsys):
    from adre_ray.distributed import cluster

    clock = {"t": 0.0}
    monkeypatch.setattr(cluster.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(cluster.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + 10.0))
    cluster.wait_for("GPU", 1, 150.0, what="test", facts=lambda: AUTOSCALED)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("test: waiting up to 150 s for 1 free GPU(s)") for line in lines)
    assert "60 s so far" in lines[1] and "120 s so far" in lines[2]


def test_without_an_autoscaler_nothing_is_asked(monkeypatch):
    asked, _ = _fake_autoscaler(monkeypatch, ONE_NODE)
    monkeypatch.setattr(certify_job, "_pool_size", lambda cfg, use_gpu: 2)
    assert certify_job.pool_plan(CertifyConfig(checkpoint="s3://b/m.pt"), False, ONE_NODE) == (2, 2)
    assert asked == []


# ------------------------------------------------------------------------------------- training refusals


@pytest.mark.parametrize("gpus", ["0.5", "2"])
def test_gpus_per_worker_other_than_one_is_refused_on_gpus(gpus):
    with pytest.raises(ValueError, match=rf"^scaling.gpus_per_worker={float(gpus)}: must be 1 with "
                                         r"scaling.use_gpu"):
        load_config(TrainConfig, None, ["scaling.use_gpu=true", f"scaling.gpus_per_worker={gpus}"])


def test_small_per_gpu_batches_are_refused_unless_sync_batchnorm():
    """The ImageNet k = 4 config on 64 GPUs: 1 image per GPU."""
    k4 = str(REPO / "jobs" / "configs" / "train_imagenet_adre_reg_k4.yaml")
    with pytest.raises(ValueError, match=r"^batch_size=64: gives 1 images per GPU worker \(scaling."
                                         r"num_workers=64\), below scaling.min_worker_batch=16"):
        load_config(TrainConfig, k4, ["scaling.num_workers=64"])
    cfg = load_config(TrainConfig, k4, ["scaling.num_workers=64", "scaling.sync_batchnorm=true"])
    assert cfg.scaling.sync_batchnorm and cfg.per_worker_batch_size == 1
    assert load_config(TrainConfig, k4, []).per_worker_batch_size == 16  # the shipped config passes


# -------------------------------------------------------------------------------------- upload excludes


def test_job_submit_excludes_keep_data_results_and_models_out_of_the_upload(tmp_path):
    """``ray job submit --runtime-env jobs/runtime_env.yaml --working-dir .`` packs the tree with Ray's own
    packager; what .gitignore misses (data/, results/, demo_output/, model files) stays out."""
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "tree"
    files = ["adre_ray/x.py", "jobs/train.py", "jobs/configs/a.yaml", "data/cifar10/test.parquet",
             "results/certify/part-0.parquet", "demo_output/model.pt", "elsewhere/best.pth", "mlflow.db",
             "runs/r/checkpoint_000001/model.pt", "tests/data/tiny.npz"]
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    (tree / ".gitignore").write_text((REPO / ".gitignore").read_text())
    excludes = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["excludes"]
    create_package(str(tree), tmp_path / "pkg.zip", include_gitignore=True, excludes=excludes)
    packed = {name for name in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not name.endswith("/")}
    assert packed == {"adre_ray/x.py", "jobs/train.py", "jobs/configs/a.yaml", ".gitignore"}


# ------------------------------------------------------------------------------ a worker group stuck


def test_capacity_watch_stops_a_wait_for_a_node_that_will_not_come():
    """Ray Train waits forever for a worker group no node fits (a node died, no autoscaler): the watch
    interrupts the blocked call after wait_s and names what is missing and what to do."""
    import time

    from adre_ray.distributed.cluster import CapacityWatch, ClusterCapacityError

    one_cpu = ClusterFacts(nodes=2, total={"CPU": 1}, free={"CPU": 1}, max_resources=None)
    began = time.monotonic()
    stuck = r"^the cluster has 1 CPUs \(and no autoscaler to add more\) but needs 2 \(waited 0.5 s; was a "
    stuck += r"node lost"
    with pytest.raises(ClusterCapacityError, match=stuck + r"\?\): re-run"), \
            CapacityWatch({"CPU": 2, "GPU": 0}, 0.5, "re-run", poll_s=0.05, facts=lambda: one_cpu):
        while time.monotonic() - began < 60:  # stands for trainer.fit() waiting for its placement group
            time.sleep(0.01)
    assert time.monotonic() - began < 30


def test_capacity_watch_stops_the_call_behind_a_sigint_handler_left_by_an_earlier_fit():
    """Ray Train's ``fit()`` registers a SIGINT handler that only logs and aborts its (finished) controller,
    and never restores the one before: a later watch still stops its call (seen in CI: the wait ran its
    full 60 s), and the watch puts back the handler from before its block whatever the call installed."""
    import signal
    import time

    from adre_ray.distributed.cluster import CapacityWatch, ClusterCapacityError

    heard: list[int] = []
    one_cpu = ClusterFacts(nodes=1, total={"CPU": 1}, free={"CPU": 1}, max_resources=None)
    before = signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))  # an earlier fit's
    try:
        began = time.monotonic()
        with pytest.raises(ClusterCapacityError, match="needs 2"), \
                CapacityWatch({"CPU": 2}, 0.2, "re-run", poll_s=0.05, facts=lambda: one_cpu):
            while time.monotonic() - began < 60:
                time.sleep(0.01)
        assert time.monotonic() - began < 30 and heard == []
        left_behind = signal.getsignal(signal.SIGINT)
        with CapacityWatch({"CPU": 1}, 5.0, "re-run", poll_s=0.05, facts=lambda: one_cpu):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # stands for the handler fit() registers
        assert signal.getsignal(signal.SIGINT) is left_behind
        with CapacityWatch({"CPU": 1}, 5.0, "re-run", poll_s=0.05, facts=lambda: one_cpu):
            signal.raise_signal(signal.SIGINT)  # a SIGINT the watch did not send: the outer handler's
        assert heard == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_passive_watch_names_the_lack_when_the_run_stops_itself_and_never_interrupts():
    """Ray Train V2: its own SIGINT handler runs during ``fit()`` and its abort does not reach a controller
    retrying a worker-group start (a multi-node run retried for 15 minutes after the watch's interrupt), so
    the run is bounded by ``controller_failure_limit`` and the watch turns the error it ends with into
    ``ClusterCapacityError``; an error after the cluster fits again is left as it is."""
    import signal
    import time

    from adre_ray.distributed.cluster import CapacityWatch, ClusterCapacityError

    heard: list[int] = []
    one_cpu = ClusterFacts(nodes=1, total={"CPU": 1}, free={"CPU": 1}, max_resources=None)
    before = signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))
    try:
        startup_failed = RuntimeError("The worker group startup timed out after 60.0 seconds")
        named = r"needs 2 \(waited 0.2 s; was a node lost\?\): re-run"
        with pytest.raises(ClusterCapacityError, match=named) as stopped, CapacityWatch(
                {"CPU": 2}, 0.2, "re-run", poll_s=0.05, facts=lambda: one_cpu, interrupt=False):
            time.sleep(1.0)  # stands for fit() retrying the start until its failure limit
            raise startup_failed
        assert stopped.value.__cause__ is startup_failed and heard == []

        looks = iter([one_cpu] * 8)
        with pytest.raises(RuntimeError, match="unrelated"), \
                CapacityWatch({"CPU": 2}, 0.2, "re-run", poll_s=0.05, facts=lambda: next(looks, ONE_NODE),
                              interrupt=False):
            time.sleep(1.5)  # lacked for 0.4 s, then a node came back
            raise RuntimeError("unrelated")
        assert heard == []
    finally:
        signal.signal(signal.SIGINT, before)


def test_training_start_attempts_are_bounded_by_resource_wait_s(monkeypatch):
    """Ray Train V2 retries a worker-group start that no node fits forever (``controller_failure_limit``
    -1); adre-ray bounds it: attempts of 60 s each covering ``run.resource_wait_s``."""
    from adre_ray.distributed.cluster import controller_failure_limit

    assert [controller_failure_limit(s) for s in (0, 10, 60, 61, 120, 900)] == [0, 0, 0, 1, 1, 14]
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    assert controller_failure_limit(120) == 3
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    cfg = load_config(TrainConfig, None, ["model=small_cnn", "run.resource_wait_s=300",
                                          "run.tracking_uri=none"])
    failure = train_job.build_trainer(cfg, run_name="bounded").run_config.failure_config
    if train_job.train_v2_enabled():
        assert failure.controller_failure_limit == 4
    assert failure.max_failures == cfg.run.max_failures

    # an autoscaler that can add nodes: the longer run.autoscale_wait_s (its node takes minutes to come)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(train_job, "cluster_facts", lambda: AUTOSCALED)
    failure = train_job.build_trainer(cfg, run_name="bounded").run_config.failure_config
    if train_job.train_v2_enabled():
        assert failure.controller_failure_limit == controller_failure_limit(900) == 14


def test_capacity_watch_lets_a_call_finish_when_the_cluster_fits_or_can_grow():
    import time

    from adre_ray.distributed.cluster import CapacityWatch

    for facts in (ONE_NODE, AUTOSCALED):  # 2 CPUs now; an autoscaler that can add them
        with CapacityWatch({"CPU": 2}, 0.1, "x", poll_s=0.02, facts=lambda f=facts: f) as watch:
            time.sleep(0.5)
        assert watch.message is None
