"""Reliability, round 3 (issue 21, items 1, 3, 4, 7 and the rough edges of analyze, convert,
import-checkpoint, result folders, help and the demo).

Each test here failed before its fix (see docs/reliability.md, "What was tried").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adre_ray import cli
from adre_ray.analysis.results import part_files
from adre_ray.models import build_model, save_model_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def certify_args(checkpoint: Path, data_dir: Path, out: str | Path, **more: object) -> list[str]:
    settings = {"checkpoint": checkpoint, "data_dir": data_dir, "output_dir": out, "sigma": 0.25, "n0": 32,
                "n": 64, "max_images": 2, "progress": "false", "shard_size": 32, "tracking_uri": "none",
                **more}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt21")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10")
    return save_model_checkpoint(root / "good.pt", model, model_name="small_cnn", num_classes=10,
                                 dataset="cifar10", extra={"sigma": 0.25})


@pytest.fixture()
def no_ray(monkeypatch):
    """Make starting Ray from ``adre-ray certify`` fail the test: refusals must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the refusal")
    monkeypatch.setattr("adre_ray.distributed.certify.connect_ray", refuse)


# ------------------------------------------------------------------- 1. one folder, one lock

_HOLD_LOCK = ("import sys, time\n"
              "from adre_ray.analysis.output_folder import output_folder_lock\n"
              "with output_folder_lock(sys.argv[1]):\n"
              "    print('locked', flush=True)\n"
              "    time.sleep(600)\n")


def _lock_holder(folder: str | Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _spellings(folder: Path, tmp_path: Path) -> list[str]:
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    return [str(folder), f"{folder}/", f"{folder}//", str(link), f"file://{folder}", f"file://{folder}/",
            f"file://localhost{folder}", os.path.relpath(folder), f"{folder}/../{folder.name}"]


@pytest.mark.parametrize("held_as", ["plain", "file_uri"])
def test_one_folder_is_one_lock_however_it_is_named(tmp_path, monkeypatch, held_as):
    """Before: a ``file://`` URI locked ``./file:/...`` instead, so two runs certified into one folder."""
    from adre_ray.analysis.output_folder import LOCK_NAME, OutputFolderBusyError, output_folder_lock

    folder = tmp_path / "out"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    holder = _lock_holder(folder if held_as == "plain" else f"file://{folder}")
    try:
        assert (folder / LOCK_NAME).is_file()
        for name in _spellings(folder, tmp_path):
            with pytest.raises(OutputFolderBusyError, match=f"pid {holder.pid} on"), output_folder_lock(name):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out"]  # no stray "file:" folder
    with output_folder_lock(f"file://{folder}") as path, output_folder_lock(folder) as again:
        assert path == again == folder / LOCK_NAME  # re-entrant in one process
    assert not (folder / LOCK_NAME).exists()


def test_certify_into_a_busy_folder_named_as_a_uri_is_refused_before_ray(checkpoint, cifar10_dir, tmp_path,
                                                                         capsys, no_ray):
    out = tmp_path / "out"
    holder = _lock_holder(out)
    try:
        code = cli.main(["certify", *certify_args(checkpoint, cifar10_dir, f"file://{out}/")])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by another run (pid {holder.pid} on" in err, err
        assert part_files(out) == [] and sorted(p.name for p in out.iterdir()) == [".adre_ray.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_certify_manifest_refusal_comes_before_ray(checkpoint, cifar10_dir, tmp_path, capsys, no_ray):
    """Before: a re-run with other settings started Ray (20-25 s) and only then was refused."""
    from adre_ray.analysis.results import ensure_manifest
    from adre_ray.distributed.certify import config_from_args, manifest_settings

    out = tmp_path / "out"
    first = config_from_args(certify_args(checkpoint, cifar10_dir, out, sigma=0.5))
    ensure_manifest(out, manifest_settings(first))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = cli.main(["certify", *certify_args(checkpoint, cifar10_dir, out)])
    err = capsys.readouterr().err
    assert code == 2 and "sigma=0.25 differs from the run already there (sigma=0.5)" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
