"""The test suite beside a Ray cluster of the machine (``ray start --head``, with a dashboard).

Before: the session fixture's ``ray.init(num_cpus=2)`` joined the cluster recorded by ``ray start`` and
every Ray test errored ("When connecting to an existing cluster, num_cpus and num_gpus must not be
provided"); and Ray Train's placement-group cleaner of the tests' cluster asked the *other* cluster's State
API whether its controller was alive, was told "no such actor" and removed the live run's placement group
(the workers died: "placement group was removed"; issue 21 saw it on a loaded machine, so the inner
training runs with every core kept busy outside Ray). The outer test starts the other cluster with a private
``RAY_TMPDIR`` (Ray keeps its ``ray_current_cluster`` record there, so the machine's other Ray users never
see it) and runs the inner test in a fresh pytest beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from background import background_case, check
from ray_head import free_port, start_head, stop_head

REPO = Path(__file__).resolve().parents[1]
BESIDE = os.environ.get("ADRE_TEST_BESIDE_CLUSTER")  # the other cluster's address, in the inner run only
TRAIN_SECONDS = 6.0  # the cleaner checks the controller every second: several checks while the worker lives


@pytest.mark.skipif(BESIDE is None, reason="the inner half of test_the_suite_runs_beside_a_ray_start_cluster")
def test_inner_own_cluster_and_a_training_that_outlives_the_cleaner_checks(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config: dict) -> None:  # nested: pickled by value (the workers cannot import tests/)
        time.sleep(config["seconds"])
        Path(config["marker"]).write_text(str(config["seconds"]))  # the worker lived to the end

    assert ray_cluster.get_runtime_context().gcs_address != BESIDE  # a cluster of the tests' own
    assert ray_cluster.cluster_resources()["CPU"] == 2

    @ray_cluster.remote(num_cpus=0)
    def state_api_address() -> str:
        """The dashboard that Ray's State API client of a worker asks (the cleaner's ``get_actor``)."""
        from ray.dashboard.utils import get_address_for_submission_client

        return get_address_for_submission_client(None)

    # before the pin: the other cluster's dashboard (its `ray start` record), which answers "no such actor"
    own = f"http://{ray_cluster._private.worker.get_dashboard_url()}"
    assert ray_cluster.get(state_api_address.remote()) == own
    config = {"seconds": TRAIN_SECONDS, "marker": str(tmp_path / "done")}
    trainer = TorchTrainer(train_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="beside", storage_path=str(tmp_path)))
    burn = "import os\nos.nice(19)\nwhile True: pass"  # below Ray's workers (nice 15), or they would starve
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    try:  # the machine loaded on purpose, as when issue 21 saw it: every core busy outside Ray
        result = trainer.fit()  # before: ControllerError, "... its placement group was removed"
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert result.error is None and (tmp_path / "done").read_text() == str(TRAIN_SECONDS)


def run_beside_a_ray_start_cluster() -> int:
    """The outer half: a `ray start` cluster of its own, then the inner test in a fresh pytest beside it;
    0 when the inner test passed (its output is printed either way)."""
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths are limited
    head_dir = os.path.join(ray_tmp, "ray")  # Ray's default temp dir under RAY_TMPDIR: the record lies here
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    try:
        # without token authentication, as many clusters run: a State API query that reaches it is answered
        # ("no such actor"), where a token-protected cluster would refuse it and the cleaner only warn
        start_head(head_dir, {**env, "RAY_AUTH_MODE": "disabled"}, num_cpus=1, dashboard_port=free_port())
        recorded = (Path(head_dir) / "ray_current_cluster").read_text().strip()  # what ray.init() would join
        inner = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-rs",
             f"tests/{Path(__file__).name}::test_inner_own_cluster_and_a_training_that_outlives_the_cleaner_checks"],
            cwd=REPO, env={**env, "ADRE_TEST_BESIDE_CLUSTER": recorded},
            capture_output=True, text=True, timeout=540)
    finally:
        stop_head(ray_tmp)
    print(inner.stdout[-6000:], inner.stderr[-3000:], sep="\n")
    return 0 if inner.returncode == 0 and "1 passed" in inner.stdout else 1


BESIDE_CASE = background_case(
    "tests/test_beside_a_cluster.py::test_the_suite_runs_beside_a_ray_start_cluster",
    [f"tests/{Path(__file__).name}"], timeout_s=600)


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_the_suite_runs_beside_a_ray_start_cluster(request):
    """Run as a subprocess beside the rest of the suite (``tests/background.py``): the whole suite then
    runs beside this `ray start` cluster too."""
    check(request, BESIDE_CASE)


if __name__ == "__main__":
    sys.exit(run_beside_a_ray_start_cluster())
