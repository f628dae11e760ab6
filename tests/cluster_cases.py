"""Multi-node cases on Ray's own test cluster (``ray.cluster_utils.Cluster``: a head with no CPUs, as on
cluster.yaml, and worker nodes with 1 CPU each, several raylets on this machine). ``remove_node`` kills a
node; ``add_node`` stands for the autoscaler's replacement.

Run by ``tests/test_multinode.py`` in a subprocess (``python -m pytest tests/cluster_cases.py``): Ray
allows one cluster connection per process, and the rest of the suite shares the session cluster of
``tests/conftest.py``. The module shares one multi-node cluster across its cases.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from adre_ray.analysis.results import read_results
from adre_ray.config import load_config
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.train import TrainConfig
from adre_ray.data import load_images
from adre_ray.distributed.certify import CertifyHooks, make_pool, run_certification
from adre_ray.distributed.cluster import ClusterCapacityError, cluster_facts
from adre_ray.distributed.train import CHECKPOINT_PREFIX, TRAIN_STATE_FILENAME, run_training
from adre_ray.models import build_model, load_model_checkpoint, save_model_checkpoint

SIGMA = 0.25
IMAGES = 4
# Ray Train gives a worker group this long to get its placement group (default 60 s); a node that is lost
# and not replaced then ends the run after one attempt of 10 s instead of 60 s (run.resource_wait_s bounds the
# attempts: adre_ray.distributed.cluster.controller_failure_limit), and a replacement's group is retried
# every 10 s until its node is up. The driver's RAY_TRAIN_* variables reach the training controller.
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
# The GCS declares a node dead after `health_check_failure_threshold` failed checks `health_check_period_ms`
# apart (defaults 5 x 3 s); a removed node's raylet refuses at once, so 3 checks 1 s apart tell the same
# in 3 s (a live but slow node still has health_check_timeout_ms, 10 s, to answer each check).
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 3}


def patiently(start, attempts: int = 3):
    """``start()``, again when Ray gives up on a raylet that took more than its fixed 30 s to register (a
    loaded machine); the half-started processes share this process's fate."""
    for attempt in range(attempts):
        try:
            return start()
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception here
            if "timed out during startup" not in str(err) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def add_worker(cluster: Cluster):
    return patiently(lambda: cluster.add_node(num_cpus=1))


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs, the driver's node) + two 1-CPU worker nodes; this process is the driver."""
    if ray.is_initialized():
        ray.shutdown()
    nodes = patiently(lambda: Cluster(initialize_head=True,
                                      head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "_system_config": FAST_NODE_DEATH}))
    workers = [add_worker(nodes) for _ in range(2)]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    nodes.workers = workers
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def node_of(actor) -> str:
    """The id of the node an actor runs on (asked of the actor itself)."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def worker_nodes(cluster: Cluster) -> list:
    return [node for node in cluster.list_all_nodes() if node is not cluster.head_node]


def train_workers() -> list[dict]:
    """The live Ray Train worker actors, from the GCS actor table (Ray's state API needs the dashboard,
    which these clusters leave out)."""
    from ray._private import state

    return [actor for actor in state.actors().values()
            if actor.get("ActorClassName") == "RayTrainWorker" and actor.get("State") == "ALIVE"]


def ensure_two_workers(cluster: Cluster) -> None:
    """Back to two live 1-CPU worker nodes (a previous case removed one)."""
    while len(worker_nodes(cluster)) < 2:
        add_worker(cluster)
    cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cifar10_dir) -> Path:
    """A seeded small_cnn with BatchNorm statistics from noisy test images (counts split between classes)."""
    torch.manual_seed(1)
    model = build_model("small_cnn", 10, "cifar10")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    images, _ = load_images("cifar10", cifar10_dir, "test", list(range(5, 10_000, 40)))
    model.train()
    with torch.no_grad():
        model(images + SIGMA * torch.randn_like(images))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_model_checkpoint(path, model.eval(), model_name="small_cnn", num_classes=10,
                                 dataset="cifar10", extra={"sigma": SIGMA})


def certify_cfg(checkpoint: Path, data_dir: Path, out: Path, **changes) -> CertifyConfig:
    settings = dict(checkpoint=str(checkpoint), dataset="cifar10", data_dir=str(data_dir), split="test",
                    sigma=SIGMA, n0=100, n=2_000, alpha=0.001, start=0, skip=1_000, max_images=IMAGES,
                    shard_size=250, batch_size=250, seed=7, output_dir=str(out), tracking_uri="none",
                    flush_images=1, progress=False, shared_filesystem=True, resource_wait_s=60.0)
    settings.update(changes)
    return CertifyConfig(**settings)


def rows(out: Path) -> list[dict]:
    return read_results(out).drop_columns(["time_s"]).sort_by("idx").to_pylist()


@pytest.fixture(scope="module")
def pool(cluster, checkpoint, cifar10_dir, tmp_path_factory):
    """One actor per worker node's CPU, shared by the cases (actor start-up dominates on busy cores)."""
    warm = make_pool(certify_cfg(checkpoint, cifar10_dir, tmp_path_factory.mktemp("unused")))
    assert len(warm) == 2
    yield warm
    warm.shutdown()


@pytest.fixture(scope="module")
def undisturbed(pool, checkpoint, cifar10_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("undisturbed") / "out"
    run_certification(certify_cfg(checkpoint, cifar10_dir, out), pool=pool)
    return rows(out)


def test_local_checkpoint_is_refused_when_actors_run_on_other_nodes(cluster, checkpoint, cifar10_dir,
                                                                    tmp_path):
    """The driver is on the head (0 CPUs): actors run on other nodes, which would not see a local file."""
    assert cluster_facts().spans_nodes
    cfg = certify_cfg(checkpoint, cifar10_dir, tmp_path / "out", shared_filesystem=False)
    with pytest.raises(ValueError, match=r"checkpoint='.*model\.pt': a local path on a cluster that spans "
                                         r"nodes \(3 nodes\).*shared_filesystem=true"):
        run_certification(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_actors_are_not_on_the_driver_node(cluster, pool, undisturbed):
    """As on cluster.yaml: the driver's node (the head, 0 CPUs) holds no actor; one actor per worker node."""
    nodes = {node_of(actor) for actor in pool.actors}
    assert len(nodes) == 2 and cluster.head_node.node_id not in nodes
    assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id


def _remove_node_of(cluster: Cluster, actor) -> str:
    node_id = node_of(actor)
    victim = next(node for node in worker_nodes(cluster) if node.node_id == node_id)
    cluster.remove_node(victim, allow_graceful=False)
    return node_id


def test_certify_survives_a_removed_node_without_replacement(cluster, pool, checkpoint, cifar10_dir,
                                                             tmp_path, undisturbed):
    """One of two worker nodes dies after the first shard: the run finishes on the actor left, every
    image once, rows identical to the undisturbed run."""
    ensure_two_workers(cluster)
    state: dict = {}

    def remove_once(pool, task):
        if not state:
            state["removed"] = _remove_node_of(cluster, pool.actors[pool.live()[0]])

    out = tmp_path / "out"
    run_certification(certify_cfg(checkpoint, cifar10_dir, out), pool=pool,
                      hooks=CertifyHooks(on_shard_done=remove_once))
    assert state["removed"] and len(pool.live()) == 1  # no node for a replacement: the run went on with one
    got = rows(out)
    assert [r["idx"] for r in got] == [r["idx"] for r in undisturbed]  # every image exactly once
    assert got == undisturbed


def test_certify_grows_onto_a_replacement_node(cluster, pool, checkpoint, cifar10_dir, tmp_path, undisturbed):
    """A node dies, a replacement arrives (the autoscaler's part): the pool refills its slot there."""
    ensure_two_workers(cluster)
    state: dict = {"live_after_add": 0}

    def remove_then_add(pool, task):
        if "removed" not in state:
            state["removed"] = _remove_node_of(cluster, pool.actors[pool.live()[0]])
        elif "added" not in state and pool.live() != list(range(len(pool))):
            state["added"] = add_worker(cluster)
        elif "added" in state:
            state["live_after_add"] = max(state["live_after_add"], len(pool.live()))

    out = tmp_path / "out"
    run_certification(certify_cfg(checkpoint, cifar10_dir, out, max_images=IMAGES + 2),
                      hooks=CertifyHooks(on_shard_done=remove_then_add), pool=pool)
    assert "added" in state and state["live_after_add"] == 2
    assert rows(out)[:IMAGES] == undisturbed


# --------------------------------------------------------------------------------------------- training

TRAIN_IMAGES = 512  # 2 workers x 4 batches of 64 per epoch


def train_cfg(cifar10_dir: Path, storage: Path, name: str, max_failures: int = 1,
              wait_s: float = 600) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"run.resource_wait_s={wait_s}", "model=small_cnn", "batch_size=128", f"data.data_dir={cifar10_dir}",
        "data.source=parquet",
        f"data.train_subset={TRAIN_IMAGES}", "data.test_subset=64", "data.loader_workers=0",
        "loss.name=gaussian", "optim.lr=0.05", "schedule.epochs=2", "scaling.num_workers=2",
        f"run.max_failures={max_failures}", f"run.name={name}", f"run.storage_path={storage}",
        "run.tracking_uri=none", "run.shared_filesystem=true",
    ])


def final_weights(result) -> dict[str, torch.Tensor]:
    model, _ = load_model_checkpoint(result.checkpoint_path, expected_model="small_cnn")
    return model.state_dict()


def wait_for_epoch_0_checkpoint(run_folder: Path, running: threading.Thread | None = None) -> None:
    """Until epoch 0's checkpoint is on disk (so epoch 1 is under way)."""
    marker = run_folder / f"{CHECKPOINT_PREFIX}000000" / TRAIN_STATE_FILENAME
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert time.monotonic() < deadline, f"no checkpoint of epoch 0 in {run_folder} after 900 s"
        assert running is None or running.is_alive(), "the training ended before its first checkpoint"
        time.sleep(0.2)


def remove_a_worker_node_in_epoch_1(cluster: Cluster, run_folder: Path) -> threading.Thread:
    """A driver-side thread: once epoch 1 is under way, kill one of the two worker nodes (each holds one
    training worker)."""
    def act() -> None:
        try:
            wait_for_epoch_0_checkpoint(run_folder)
            cluster.remove_node(worker_nodes(cluster)[-1], allow_graceful=False)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    errors: list[BaseException] = []
    thread = threading.Thread(target=act, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.fixture(scope="module")
def undisturbed_training(cluster, pool, cifar10_dir, tmp_path_factory):
    pool.shutdown()  # the certification actors hold the worker nodes' CPUs: free them for training
    ensure_two_workers(cluster)
    deadline = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.5)
    return run_training(train_cfg(cifar10_dir, tmp_path_factory.mktemp("train"), "undisturbed"))


def test_training_restarts_on_a_replacement_node_with_equal_final_weights(cluster, cifar10_dir, tmp_path,
                                                                         undisturbed_training):
    """Two workers on two nodes; one node is removed in epoch 1 and a replacement added: Ray Train
    (run.max_failures=1) restarts the group from the last committed checkpoint, and the final weights
    equal the undisturbed run's."""
    ensure_two_workers(cluster)
    storage = tmp_path / "runs"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(train_cfg(cifar10_dir, storage, "disturbed"))
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome["error"] = err

    # the training runs in a thread: cluster_utils' add_node registers signal handlers, which only the
    # main thread may do (from a thread it raised and the replacement never came)
    training = threading.Thread(target=train, daemon=True)
    training.start()
    wait_for_epoch_0_checkpoint(storage / "disturbed", training)
    cluster.remove_node(worker_nodes(cluster)[-1], allow_graceful=False)
    add_worker(cluster)
    training.join(timeout=900)
    assert not training.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert len(worker_nodes(cluster)) == 2  # the node was removed and replaced
    assert result.metrics["epoch"] == 1
    got, want = final_weights(result), final_weights(undisturbed_training)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[key], want[key]) for key in want)


def test_training_without_a_replacement_node_stops_with_a_message(cluster, cifar10_dir, tmp_path,
                                                                  undisturbed_training):
    """A node dies and none replaces it: the run stops (never hangs) with a message saying what to do."""
    ensure_two_workers(cluster)
    storage = tmp_path / "runs"
    thread = remove_a_worker_node_in_epoch_1(cluster, storage / "lost")
    with pytest.raises(ClusterCapacityError, match=r"the cluster has 1 CPUs \(and no autoscaler to add "
                                                   r"more\) but needs 2 .*was a node lost.*re-run the same"):
        run_training(train_cfg(cifar10_dir, storage, "lost", wait_s=10))
    thread.join(timeout=60)
    assert not thread.is_alive() and thread.errors == [] and len(worker_nodes(cluster)) == 1


# ------------------------------------------------------------------------------------------------- tune


def test_tune_search_finishes_when_a_trials_node_is_removed(cluster, cifar10_dir, tmp_path,
                                                            undisturbed_training):
    """tiny_cpu.yaml (two 1-worker trials at once, one per worker node); once both trials' Train workers
    run, the node of the one that started last is removed: that trial fails, the other finishes, the
    search ends, and MLflow's child runs agree with trials.csv (the failed trial's run FAILED, the other
    FINISHED)."""
    import csv

    from mlflow.tracking import MlflowClient

    from adre_ray.distributed.tune import TRIAL_ID_TAG, TRIALS_FILENAME
    from adre_ray.distributed.tune import main as tune_main

    ensure_two_workers(cluster)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    errors: list[BaseException] = []

    def remove_when_both_trials_run() -> None:
        try:  # both trials' Train workers alive (all CPUs reserved is not enough: a placement group
            # holds its CPU before its worker starts and after it ends); the younger trial's node goes
            deadline = time.monotonic() + 900
            while len(train_workers()) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            youngest = max(train_workers(), key=lambda actor: actor["StartTime"])
            time.sleep(2.0)
            cluster.remove_node(next(node for node in worker_nodes(cluster)
                                     if node.node_id == youngest["Address"]["NodeID"]), allow_graceful=False)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    thread = threading.Thread(target=remove_when_both_trials_run, daemon=True)
    thread.start()
    rc = tune_main(["--space", str(Path(__file__).resolve().parents[1] / "tune_spaces" / "tiny_cpu.yaml"),
                    "--config", str(Path(__file__).resolve().parents[1] / "jobs" / "configs"
                                    / "train_cifar10_small_cpu.yaml"),
                    "--output-dir", str(tmp_path / "out"), "--set", f"data.data_dir={cifar10_dir}",
                    "--set", "run.shared_filesystem=true", "--set", f"run.tracking_uri={uri}"])
    thread.join(timeout=60)
    assert errors == [] and len(worker_nodes(cluster)) == 1
    with (tmp_path / "out" / "tiny_cpu" / TRIALS_FILENAME).open() as handle:
        rows = list(csv.DictReader(handle))
    statuses = sorted(row["status"] for row in rows)
    assert len(rows) == 2 and statuses == ["COMPLETED", "ERROR"], statuses
    assert rc == 0  # the finished trial is the best
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("adre-tune").experiment_id])
    children = {r.data.tags[TRIAL_ID_TAG]: r.info.status for r in runs if TRIAL_ID_TAG in r.data.tags}
    expected = {"COMPLETED": "FINISHED", "ERROR": "FAILED"}
    assert children == {row["trial_id"]: expected[row["status"]] for row in rows}
