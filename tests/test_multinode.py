"""The multi-node cases (``tests/cluster_cases.py``) in a subprocess: they need their own Ray cluster of
several nodes (``ray.cluster_utils.Cluster``), and a process holds one Ray connection, which the rest of
the suite gives to the session cluster of ``conftest.py``. The subprocess runs beside the rest of the
suite from its start (``tests/background.py``); its report is shown on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from background import background_case, check

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = Path(os.environ.get("ADRE_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


def _no_data() -> str | None:
    if (SHARED_CIFAR10 / "test.parquet").is_file():
        return None
    return f"CIFAR-10 Parquet not found at {SHARED_CIFAR10} (set ADRE_CIFAR10_DIR)"


CASES = background_case("tests/test_multinode.py::test_multinode_cases",
                        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "tests/cluster_cases.py"],
                        timeout_s=1500, env={"ADRE_CIFAR10_DIR": str(SHARED_CIFAR10)}, skip_reason=_no_data)


@pytest.mark.slow
@pytest.mark.timeout(1600)  # the subprocess's own limit and its report first
def test_multinode_cases(request):
    check(request, CASES)
