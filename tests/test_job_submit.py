"""`ray job submit` end to end: a real local head node with the job server on loopback runs
jobs/certify.py shipped with --working-dir; the test reads the job's Parquet output and stops the head.

The head gets its own --temp-dir and ports and is stopped by killing exactly its processes (never
`ray stop`, which would also stop the session-wide cluster of the other tests).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from ray_head import RAY, free_port, start_head, stop_head

from adre_ray.analysis.results import read_results
from adre_ray.models import build_model, save_model_checkpoint
from adre_ray.smoothing import certify_counts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ray_head():
    """A Ray head on loopback with the job server; yields its dashboard address, stops it afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="adre_jobs_", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0",
           # token authentication (default-on for local clusters in recent Ray): a fresh token for this head
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    try:
        dashboard_port = start_head(temp_dir, env, num_cpus=2, dashboard_port=free_port())
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        stop_head(temp_dir)


def test_certify_job_via_ray_job_submit(ray_head, tmp_path, cifar10_dir):
    address, env = ray_head
    torch.manual_seed(0)
    checkpoint = save_model_checkpoint(tmp_path / "model.pt", build_model("small_cnn", 10, "cifar10").eval(),
                                       model_name="small_cnn", num_classes=10, dataset="cifar10")
    out = tmp_path / "certify_out"
    job_args = ["jobs/certify.py", "--checkpoint", str(checkpoint), "--data-dir", str(cifar10_dir),
                "--sigma", "0.25", "--n0", "32", "--n", "256", "--alpha", "0.01", "--skip", "2500",
                "--max-images", "3", "--actors", "1", "--batch-size", "128", "--shard-size", "128",
                "--output-dir", str(out), "--tracking-uri", "none", "--no-progress"]
    runtime_env = {"excludes": [".venv", ".git", "runs", "results", "demo_output", "*.db"]}
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, *job_args]
    started = time.monotonic()
    while True:  # the head's job agent comes up a little after `ray start` returns
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
        log = proc.stdout + proc.stderr
        if proc.returncode == 0 or "No available agent" not in log or time.monotonic() - started > 120:
            break
        time.sleep(3)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"ray job submit failed after {elapsed:.0f}s:\n{log[-4000:]}"
    assert "succeeded" in log.lower(), log[-4000:]

    table = read_results(out)
    assert table.column("idx").to_pylist() == [0, 2500, 5000]
    for row in table.to_pylist():  # the job's stored radii follow from its stored counts
        expected = certify_counts(row["pilot_counts"], row["counts"], 0.25, 0.01)
        assert row["certify_predict"] == expected.predict
        assert row["radius_certify"] == pytest.approx(expected.radius, abs=1e-12)
        assert sum(row["counts"]) == 256
