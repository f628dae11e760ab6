"""The multi-node cases (``tests/cluster_cases.py``) in a subprocess: they need their own Ray cluster of
several nodes (``ray.cluster_utils.Cluster``), and a process holds one Ray connection, which the rest of
the suite gives to the session cluster of ``conftest.py``. The subprocess runs beside the rest of the
suite from its start (``tests/background.py``); its report is shown on failure."""

from __future__ import annotations

import pytest
from background import background_case, check
from conftest import SHARED_CIFAR10, cifar10_missing

CASES = background_case("tests/test_multinode.py::test_multinode_cases",
                        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "tests/cluster_cases.py"],
                        timeout_s=1500, env={"ADRE_CIFAR10_DIR": str(SHARED_CIFAR10)},
                        skip_reason=cifar10_missing)


@pytest.mark.slow
@pytest.mark.timeout(1600)  # the subprocess's own limit and its report first
def test_multinode_cases(request):
    check(request, CASES)
