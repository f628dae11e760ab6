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


# ------------------------------------------------------- 7. analyze never pools runs or MLflow copies


def _row(idx: int, label: int, cls: int, radius: float, checkpoint: str) -> dict:
    counts = [1] * 10
    counts[max(cls, 0)] = 991
    return {
        "idx": idx, "label": label, "predict": cls, "correct": cls == label, "correct_tcertify": cls == label,
        "certify_predict": cls, "tcertify_predict": cls, "radius_certify": radius, "radius_tcertify": radius,
        "tcertify_mode": "pilot", "pA_lower": 0.9, "pB_upper": 0.05, "alpha_prime": 0.001,
        "pA_lower_certify": 0.9, "counts": counts, "pilot_counts": counts, "n0": 100, "n": 1000,
        "alpha": 0.001, "sigma": 0.25, "seed": 0, "time_s": 0.1, "checkpoint": checkpoint, "train_run_id": "",
    }


def _result_folder(folder: Path, checkpoint: str, indices: range) -> Path:
    from adre_ray.analysis.results import MANIFEST_FIELDS, ensure_manifest, write_part

    settings = {key: None for key in MANIFEST_FIELDS}
    settings.update(checkpoint=checkpoint, sigma=0.25, n0=100, n=1000, alpha=0.001, mode="pilot", seed=0)
    ensure_manifest(folder, settings)
    write_part(folder, [_row(i, i % 10, i % 10 if i % 3 else -1, 0.1 * (i % 5), checkpoint) for i in indices])
    return folder


def _demo_like_output(root: Path) -> dict[str, Path]:
    """The layout of ``adre-ray demo``'s folder: two models' results and MLflow's copies of them."""
    import shutil

    folders = {loss: _result_folder(root / "certify" / loss, f"/runs/demo_{loss}/model.pt", range(50))
               for loss in ("adre_reg", "gaussian")}
    for number, folder in enumerate(folders.values()):
        shutil.copytree(folder, root / "mlartifacts" / "1" / f"run{number}" / "artifacts" / "results")
    (root / "analysis").mkdir()
    return folders


def test_analyze_of_a_demo_folder_refuses_to_pool_two_models(tmp_path, capsys):
    """Before: four Parquet folders (two models + two MLflow copies) became one row of 200 images, exit 0."""
    demo = tmp_path / "demo_output"
    folders = _demo_like_output(demo)
    code = cli.main(["analyze", str(demo), "--output-dir", str(tmp_path / "a"), "--no-log-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "different checkpoints" in err, err
    assert all(str(f) in err for f in folders.values()) and "--label" in err
    assert "mlartifacts" not in err.split("e.g.")[0]  # the copies are not among the results found
    assert not (tmp_path / "a").exists()


def test_analyze_reads_a_folder_once_beside_its_mlflow_copy_and_says_what_it_read(tmp_path, capsys):
    import json
    import shutil

    demo = tmp_path / "demo_output"
    folders = _demo_like_output(demo)
    shutil.rmtree(folders["gaussian"])
    code = cli.main(["analyze", str(demo), "--output-dir", str(tmp_path / "a"), "--no-log-mlflow"])
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [s["metrics"]["certify/num_images"] for s in summary.values()] == [50.0]  # not 100 (the copies) nor 150
    assert f"read 50 rows from {folders['adre_reg']}" in err
    assert f"not read: MLflow artifact copies in {demo / 'mlartifacts'}" in err


def test_analyze_pools_the_folders_of_one_run_but_never_an_image_twice(tmp_path, capsys):
    root = tmp_path / "split_run"
    _result_folder(root / "first", "/m.pt", range(0, 20))
    _result_folder(root / "second", "/m.pt", range(20, 40))
    assert cli.main(["analyze", str(root), "--output-dir", str(tmp_path / "a"), "--no-log-mlflow"]) == 0
    assert "read 40 rows from" in capsys.readouterr().err
    _result_folder(root / "third", "/m.pt", range(30, 35))
    assert cli.main(["analyze", str(root), "--output-dir", str(tmp_path / "b"), "--no-log-mlflow"]) == 2
    assert "idx=30 is in both" in capsys.readouterr().err
