"""cluster.yaml: valid for Ray's cluster launcher and holds what adre-ray's jobs need."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_launcher_schema_accepts_it(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(dict(cluster)))  # raises on any schema error


def test_head_and_gpu_worker_types(cluster):
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    gpu_types = {name: t for name, t in node_types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, node_type in gpu_types.items():
        assert name != cluster["head_node_type"]
        assert node_type["resources"]["GPU"] == 8
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cluster["max_workers"]
        assert node_type["node_config"]["InstanceType"]


def test_cpu_only_ingest_worker_type(cluster):
    """Ray Data's decode tasks get CPU-only nodes beside the GPU workers (issue 14)."""
    node_types = cluster["available_node_types"]
    cpu_only = {name: t for name, t in node_types.items() if name != cluster["head_node_type"]
                and t.get("resources", {}).get("GPU", 0) == 0 and t.get("resources", {}).get("CPU", 0) > 0}
    assert cpu_only, "no CPU-only worker type for ingest"
    total = sum(t["max_workers"] for name, t in node_types.items() if name != cluster["head_node_type"])
    assert total <= cluster["max_workers"]
    for node_type in cpu_only.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
        assert node_type["node_config"]["InstanceType"]


def test_installs_and_mounts_the_project(cluster):
    assert "." in cluster["file_mounts"].values(), "the project code is not mounted on the nodes"
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    setup = " && ".join(cluster["setup_commands"])
    assert "pip install" in setup and mount in setup
    assert any("ray start --head" in cmd for cmd in cluster["head_start_ray_commands"])
    assert any("ray start --address" in cmd for cmd in cluster["worker_start_ray_commands"])
    assert ".venv" in cluster["rsync_exclude"]


def test_states_the_driver_minimum_and_installs_into_a_virtualenv(cluster):
    """torch 2.14.1 from pip needs CUDA 13.0, i.e. NVIDIA driver >= 580; system pip refuses (PEP 668)."""
    text = CLUSTER_YAML.read_text()
    assert "R580" in text and ">= 580" in text
    setup = cluster["setup_commands"]
    assert any("python3 -m venv" in cmd for cmd in setup)
    installs = [cmd for cmd in setup if "pip install" in cmd]
    assert installs and all("venv/bin/python -m pip" in cmd for cmd in installs)
    assert any("activate" in cmd and ".bashrc" in cmd for cmd in setup)
