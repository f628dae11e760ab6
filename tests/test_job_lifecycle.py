"""How jobs start, wait and stop (issue 21 items 5, 6 and the rough edges): an unreachable ``--address``
fails at once naming it; a certification that stops making progress says so and stops at its deadline;
SIGTERM stops a job like Ctrl-C (one line, exit 143); a resumed certification's MLflow steps continue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_reliability_round2 import certify_args

from adre_ray.distributed._common import free_local_port
from adre_ray.models import build_model, save_model_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL_CPU_CONFIG = REPO / "jobs" / "configs" / "train_cifar10_small_cpu.yaml"
TINY_SPACE = REPO / "tune_spaces" / "tiny_cpu.yaml"
RESUME_LINE = "adre-ray certify: interrupted; re-run the same command to resume"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model_checkpoint(tmp_path_factory.mktemp("lifecycle") / "model.pt",
                                 build_model("small_cnn", 10, "cifar10"), model_name="small_cnn",
                                 num_classes=10, dataset="cifar10", extra={"sigma": 0.25})


def _settings(model: Path, data_dir: Path, out: Path, *more: str) -> list[str]:
    return [f"checkpoint={model}", f"data_dir={data_dir}", f"output_dir={out}", "sigma=0.25", "n0=32",
            "n=64", "shard_size=32", "num_actors=1", "progress=false", *more]


@pytest.mark.parametrize("command", ["certify", "train", "tune"])
def test_an_unreachable_address_exits_2_naming_it_before_ray_is_asked(command, model, tmp_path,
                                                                       monkeypatch, capsys):
    """Before: Ray retried the GCS for over 300 s without a word. Now a TCP check (ADDRESS_TIMEOUT_S = 10 s;
    a closed port answers at once) refuses the address before ``ray.init`` is called."""
    import ray

    from adre_ray import cli

    address = f"127.0.0.1:{free_local_port()}"  # nothing listens there
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `adre-ray` process
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail(f"ray.init called with {a} {k}"))
    argv = {"certify": ["--checkpoint", str(model), "--output-dir", str(tmp_path / "o"),
                        "--tracking-uri", "none"],
            "train": ["--set", f"run.storage_path={tmp_path / 'runs'}"],
            "tune": ["--space", str(TINY_SPACE), "--config", str(SMALL_CPU_CONFIG), "--output-dir",
                     str(tmp_path / "o")]}[command]
    assert cli.main([command, *argv, "--address", address]) == 2
    err = capsys.readouterr().err
    assert f"adre-ray {command}: error: address='{address}': no Ray cluster reachable there within 10 s" \
        in err, err


def test_a_certification_without_progress_says_so_then_stops_at_its_deadline(ray_cluster, model,
                                                                             cifar10_dir, tmp_path,
                                                                             monkeypatch, capsys):
    """The pool's only actor is frozen (SIGSTOP; as an actor on a lost node, nothing comes back): a line on
    stderr while waiting, then ``ValueError`` naming ``stall_timeout_s``. Before: ``ray.wait`` forever."""
    from adre_ray.config import load_config
    from adre_ray.config.certify import CertifyConfig
    from adre_ray.distributed import certify as certify_mod
    from adre_ray.distributed import certify_scheduler

    monkeypatch.setattr(certify_scheduler, "STALL_MESSAGE_S", 1.0)
    cfg = load_config(CertifyConfig, None, _settings(model, cifar10_dir, tmp_path / "out", "max_images=2",
                                                     "tracking_uri=none", "stall_timeout_s=4"))
    pool = certify_mod.make_pool(cfg)
    pid = ray_cluster.get(pool.actors[0].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(ValueError, match=r"stall_timeout_s=4: no shard finished for [4-9] s \(\d+ shard"):
            certify_mod.run_certification(cfg, pool=pool)
    finally:
        os.kill(pid, signal.SIGCONT)
        pool.shutdown()
    assert "adre-ray certify: no shard finished for" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_prints_one_line_and_exits_143_and_the_same_command_resumes(model, cifar10_dir,
                                                                            tmp_path):
    """Before: exit 134 and Ray's C++ stack dump. The job runs as a user's would: its own private cluster
    (``--address local``, a private RAY_TMPDIR)."""
    from adre_ray.analysis.results import part_files, read_results

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    cmd = [sys.executable, "-m", "adre_ray.cli", "certify", "--address", "local",
           *certify_args(model, cifar10_dir, out, num_actors=1, max_images=40,
                         flush_images=1, tracking_uri="none")]
    log = tmp_path / "job.log"
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while not (out.is_dir() and part_files(out)):  # it is certifying
            assert job.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no part written"
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    text = log.read_text()
    assert code == 143, text[-4000:]
    assert text.rstrip().endswith(RESUME_LINE), text[-4000:]
    assert "Aborted" not in text and "SIGABRT" not in text and "*** " not in text, text[-4000:]
    written = read_results(out).column("idx").to_pylist()
    assert 0 < len(written) < 40 and len(written) == len(set(written))


def test_after_ray_starts_sigterm_raises_terminated_which_every_job_maps_to_143(capsys):
    """The handler ``connect_ray`` installs once Ray is up (Ray's own ended jobs with exit 134)."""
    from adre_ray.distributed import _common

    before = signal.getsignal(signal.SIGTERM)
    try:
        _common.stop_on_sigterm()
        with pytest.raises(_common.Terminated) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
    finally:
        signal.signal(signal.SIGTERM, before)
    assert isinstance(stop.value, KeyboardInterrupt)  # so every `except KeyboardInterrupt` of the jobs stops
    for command in ("certify", "train", "tune", "convert"):
        assert _common.interrupted(command, stop.value) == 143
        assert _common.interrupted(command, KeyboardInterrupt()) == 130
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == RESUME_LINE and len(lines) == 8
