"""The multi-node cases (``tests/cluster_cases.py``) in a subprocess: they need their own Ray cluster of
several nodes (``ray.cluster_utils.Cluster``), and a process holds one Ray connection, which the rest of
the suite gives to the session cluster of ``conftest.py``. The subprocess's report is shown on failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = Path(os.environ.get("ADRE_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


@pytest.mark.slow
@pytest.mark.timeout(1600)  # the subprocess's own limit (1,500 s) and its report first
def test_multinode_cases():
    if not (SHARED_CIFAR10 / "test.parquet").is_file():
        pytest.skip(f"CIFAR-10 Parquet not found at {SHARED_CIFAR10} (set ADRE_CIFAR10_DIR)")
    env = {**os.environ, "ADRE_CIFAR10_DIR": str(SHARED_CIFAR10),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           str(REPO / "tests" / "cluster_cases.py")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
