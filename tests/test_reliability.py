"""Reliability (issue 8): a Ray Train worker killed mid-epoch, bad input through the command line, corrupt
data and result files, mismatched checkpoints, and the bound properties the other tests leave out.

Bad input must give a clear error naming the field and value (exit code 2 from ``adre-ray``) and must
change nothing already written: each CLI case snapshots the folders it could touch before and after.
Tests run as root, so ``chmod 000`` would not make a file unreadable; unreadable data is simulated with
files that are not Parquet / not an image instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adre_ray import cli
from adre_ray.analysis.results import ensure_manifest, part_files, write_part
from adre_ray.config import load_config
from adre_ray.config.train import TrainConfig
from adre_ray.distributed import certify as certify_mod
from adre_ray.distributed import faults as faults_mod
from adre_ray.distributed.certify import manifest_settings, result_row
from adre_ray.distributed.faults import (
    FAULT_KILL_ENV,
    FAULT_MARKER_ENV,
    FAULT_MARKER_NAME,
    FaultKill,
    fault_worker_env,
)
from adre_ray.distributed.train import CHECKPOINT_PREFIX, TRAIN_STATE_FILENAME, run_training
from adre_ray.models import build_model, load_model_checkpoint, save_model_checkpoint
from adre_ray.smoothing import certify_counts, pA_lower, tcertify_counts

TRAIN_IMAGES, TEST_IMAGES = 256, 64


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` -> sha256 of its bytes (folders as entries too), for before/after checks."""
    found: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted([root, *root.rglob("*")]):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


# -- 1. faults: a Ray Train worker killed mid-epoch -----------------------------------------------------


def test_fault_spec_is_parsed_strictly_and_off_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(FAULT_KILL_ENV, raising=False)
    monkeypatch.delenv(FAULT_MARKER_ENV, raising=False)
    assert FaultKill.from_env() is None and fault_worker_env(str(tmp_path)) == {}  # production: nothing
    assert FaultKill.parse(" epoch=1, rank=0 ,batch=12") == FaultKill(epoch=1, rank=0, batch=12)
    for bad in ("epoch=1,rank=1", "epoch=1,rank=1,batch=-2", "epoch=1,rank=1,batch=2,batch=3",
                "epoch=1,rank=x,batch=2", "epoch=²,rank=1,batch=2", "when=1,rank=1,batch=2", ""):
        with pytest.raises(ValueError, match=rf"^{FAULT_KILL_ENV}="):
            FaultKill.parse(bad)
    monkeypatch.setenv(FAULT_KILL_ENV, "epoch=0,rank=0,batch=1")
    assert fault_worker_env(str(tmp_path / "run")) == {
        FAULT_KILL_ENV: "epoch=0,rank=0,batch=1", FAULT_MARKER_ENV: f"{tmp_path}/run/{FAULT_MARKER_NAME}"}
    with pytest.raises(ValueError, match="local run.storage_path"):
        fault_worker_env("s3://bucket/run")


class _Exited(BaseException):
    pass


def test_fault_fires_once_at_the_given_batch_only(monkeypatch, tmp_path):
    """``os._exit`` is replaced by an exception here, so a wrong firing fails the test, not pytest."""
    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(faults_mod.os, "_exit", fake_exit)
    fault = FaultKill(epoch=1, rank=1, batch=2, marker=str(tmp_path / FAULT_MARKER_NAME))
    batches = list(range(5))
    assert fault.wrap(batches, epoch=0, rank=1) is batches and fault.wrap(batches, epoch=1, rank=0) is batches
    seen = []
    with pytest.raises(_Exited):
        for batch in fault.wrap(batches, epoch=1, rank=1):
            seen.append(batch)
    assert seen == [0, 1] and (tmp_path / FAULT_MARKER_NAME).read_text() == "epoch=1,rank=1,batch=2\n"
    wrapped = fault.wrap(batches, epoch=1, rank=1)
    assert len(wrapped) == 5 and list(wrapped) == batches  # the restarted worker: marker there, no crash


def _small_train_config(cifar10_dir: Path, storage: Path, name: str, epochs: int,
                        max_failures: int) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "model=small_cnn", "batch_size=64", f"data.data_dir={cifar10_dir}", "data.source=parquet",
        f"data.train_subset={TRAIN_IMAGES}", f"data.test_subset={TEST_IMAGES}", "data.loader_workers=0",
        "loss.name=adre_reg", "loss.k=2", "loss.lam=0.1", "optim.lr=0.05", f"schedule.epochs={epochs}",
        "scaling.num_workers=2", f"run.max_failures={max_failures}", f"run.name={name}",
        f"run.storage_path={storage}", "run.experiment=test-fault",
    ])


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_from_last_checkpoint(ray_cluster, cifar10_dir, mlflow_uri, tmp_path,
                                                              monkeypatch):
    """Rank 1 exits (os._exit(1)) before batch 2 of epoch 1 (each worker has 256 / 64 = 4 batches per
    epoch); FailureConfig(max_failures=1) restarts the group from the epoch-0 checkpoint and the run ends
    after epoch 1. Proof that it resumed rather than restarted: rank 0 logs each finished epoch to MLflow
    once, so a run from scratch would log epoch 0 twice."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(FAULT_KILL_ENV, "epoch=1,rank=1,batch=2")
    storage = tmp_path / "runs"
    result = run_training(_small_train_config(cifar10_dir, storage, "killed", epochs=2, max_failures=1))

    marker = storage / "killed" / FAULT_MARKER_NAME
    assert marker.read_text() == "epoch=1,rank=1,batch=2\n"  # the fault did fire
    # the epoch-0 checkpoint was written before the crash and never again (a restart from scratch
    # would have re-written it after the marker)
    first_state = storage / "killed" / f"{CHECKPOINT_PREFIX}000000" / TRAIN_STATE_FILENAME
    assert first_state.stat().st_mtime_ns <= marker.stat().st_mtime_ns
    assert result.metrics["epoch"] == 1 and result.metrics["train_images"] == TRAIN_IMAGES
    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(result.mlflow_run_id, "l_per")
    assert sorted(m.step for m in history) == [0, 1]
    assert result.checkpoint_path.endswith(f"{CHECKPOINT_PREFIX}000001")
    model, meta = load_model_checkpoint(result.checkpoint_path, expected_model="small_cnn",
                                        expected_num_classes=10)
    assert meta["extra"]["epoch"] == 1
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
    state = torch.load(Path(result.checkpoint_path) / TRAIN_STATE_FILENAME, weights_only=True)
    assert state["scheduler"]["last_epoch"] == 8  # 4 restored steps + the 4 of the re-run epoch 1


# -- 2. bad input through the command line: exit 2, the field and value named, nothing written -----------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """A 10-class and a 5-class small_cnn checkpoint (random weights; only their identity matters here)."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    saved = {}
    for classes in (10, 5):
        model = build_model("small_cnn", classes, "cifar10")
        saved[classes] = save_model_checkpoint(root / f"c{classes}.pt", model, model_name="small_cnn",
                                               num_classes=classes, dataset="cifar10", extra={"sigma": 0.25})
    return saved


@pytest.fixture()
def workspace(tmp_path, monkeypatch, checkpoints, cifar10_dir) -> dict[str, Path]:
    """cwd: an empty folder; ``out``: a certification folder holding a finished run (manifest + a part);
    ``runs``: a training storage folder holding a file; MLflow store: ``tmp_path/mlflow.db`` (absent).
    Ray must not start: ``ray.init`` fails the test and Ray's auto-connect is off."""
    import ray

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("RAY_ENABLE_AUTO_CONNECT", "0")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("bad input must not start Ray"))
    if not ray.is_initialized():  # certify's main joins Ray before run_certification reads its inputs
        monkeypatch.setattr(certify_mod, "connect_ray", lambda *a, **k: False)
    out = tmp_path / "out"
    cfg = certify_mod.config_from_args(certify_args(checkpoints[10], cifar10_dir, out))
    ensure_manifest(out, manifest_settings(cfg))
    pilot, counts = np.eye(10, dtype=np.int64)[1] * 32, np.array([2, 60, 2, 0, 0, 0, 0, 0, 0, 0])
    write_part(out, [result_row(0, 1, pilot, counts, sigma=0.25, alpha=0.001, mode="pilot", grid=cfg.grid,
                                seed=0, time_s=0.1, checkpoint=str(checkpoints[10]), train_run_id=None)])
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "keep.txt").write_text("an earlier run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # not made: bad input
    return {"root": tmp_path, "cwd": cwd, "out": out, "runs": runs, "mlflow_db": tmp_path / "mlflow.db"}


def certify_args(checkpoint: Path, data_dir: Path, out: Path) -> list[str]:
    """Settings as ``--set`` (a convenience flag such as ``--sigma`` would win over a later ``--set``)."""
    settings = {"checkpoint": checkpoint, "data_dir": data_dir, "output_dir": out, "sigma": 0.25, "n0": 32,
                "n": 64, "max_images": 2, "progress": "false"}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


TRAIN_BAD = [
    ("loss.sigma=0", "loss.sigma=0.0"), ("loss.sigma=-1.0", "loss.sigma=-1.0"), ("loss.k=0", "loss.k=0"),
    ("loss.lam=-0.1", "loss.lam=-0.1"), ("loss.epsilon=-0.5", "loss.epsilon=-0.5"),
    ("loss.steps=0", "loss.steps=0"), ("model=resnet9000", "model='resnet9000'"),
    ("data.dataset=mnist", "data.dataset='mnist'"), ("loss.name=hinge", "loss.name='hinge'"),
    ("loss.lam=high", "loss.lam='high'"), ("loss.lambda=0.2", "loss.lambda=0.2: unknown config key"),
]
CERTIFY_BAD = [
    ("sigma=0", "sigma=0.0"), ("sigma=-0.25", "sigma=-0.25"), ("alpha=0", "alpha=0.0"),
    ("alpha=1", "alpha=1.0"), ("alpha=1.5", "alpha=1.5"), ("n0=0", "n0=0"), ("n=0", "n=0"),
    ("tcertify_mode=fast", "tcertify_mode='fast'"), ("dataset=mnist", "dataset='mnist'"),
    ("grid=[0.0, 1.0]", "grid=(0.0, 1.0): value 0.0 lies outside (0, 1]"),
    ("grid=[0.5, 1.5]", "grid=(0.5, 1.5): value 1.5 lies outside (0, 1]"),
    ("grid=[]", "grid=(): must hold at least one value"),
]
DEMO_BAD = [("sigma=0", "sigma=0.0"), ("lam=-1", "lam=-1.0"), ("k=0", "k=0"), ("alpha=1", "alpha=1.0")]
CASES = ([("train", *c) for c in TRAIN_BAD] + [("certify", *c) for c in CERTIFY_BAD]
         + [("demo", *c) for c in DEMO_BAD])


@pytest.mark.parametrize("command, override, named", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_cli_bad_value_exits_2_naming_it_and_writes_nothing(command, override, named, workspace, checkpoints,
                                                           cifar10_dir, capsys):
    before = snapshot(workspace["root"])
    if command == "train":
        argv = ["train", "--set", f"data.data_dir={cifar10_dir}", "--set", "model=small_cnn",
                "--set", f"run.storage_path={workspace['runs']}", "--set", override]
    elif command == "certify":
        argv = ["certify", *certify_args(checkpoints[10], cifar10_dir, workspace["out"]), "--set", override]
    else:
        argv = ["demo", "--output-dir", str(workspace["out"]), "--set", override]
    code, err = run_cli(argv, capsys)
    assert code == 2 and f"adre-ray {command}: error: " in err and named in err, err
    assert snapshot(workspace["root"]) == before  # cwd still empty, out / runs untouched, no MLflow db


def _write_parquet(path: Path, images: list[bytes]) -> None:
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array([3] * len(images),
                                                                                         pa.int16())}), path)


@pytest.mark.parametrize("layout, named", [
    pytest.param("missing", "no such directory", id="missing"),
    pytest.param("empty", "no CIFAR-10 'test' split found", id="empty"),
    pytest.param("text", "test.parquet': not a readable Parquet file", id="text"),
    pytest.param("zero_bytes", "test.parquet': not a readable Parquet file", id="zero_bytes"),
    pytest.param("no_rows", "test.parquet': holds no rows", id="no_rows"),
])
def test_certify_bad_data_dir_exits_2_and_writes_nothing(layout, named, workspace, checkpoints, capsys):
    data = workspace["root"] / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "text":
        (data / "test.parquet").write_text("label,image\n3,not an image\n")
    elif layout == "zero_bytes":
        (data / "test.parquet").write_bytes(b"")
    elif layout == "no_rows":
        _write_parquet(data / "test.parquet", [])
    before = snapshot(workspace["root"])
    code, err = run_cli(["certify", *certify_args(checkpoints[10], data, workspace["out"])], capsys)
    assert code == 2 and named in err and str(data) in err, err
    assert snapshot(workspace["root"]) == before


def test_train_empty_data_dir_exits_2_before_ray(workspace, capsys):
    """(A missing data_dir is tests/test_train_ray.py::test_missing_data_exits_2_before_starting_ray.)"""
    empty = workspace["root"] / "empty"
    empty.mkdir()
    before = snapshot(workspace["root"])
    code, err = run_cli(["train", "--set", f"data.data_dir={empty}", "--set", "model=small_cnn",
                         "--set", f"run.storage_path={workspace['runs']}"], capsys)
    assert code == 2 and f"data_dir='{empty}': no CIFAR-10 'train' split found" in err, err
    assert snapshot(workspace["root"]) == before


def test_train_unreadable_parquet_exits_2_before_ray(workspace, cifar10_dir, capsys):
    """A ``train.parquet`` that is not Parquet is refused on the driver, before Ray or MLflow start."""
    data = workspace["root"] / "bad_data"
    data.mkdir()
    (data / "train.parquet").write_text("not parquet\n")
    (data / "test.parquet").write_bytes((cifar10_dir / "test.parquet").read_bytes())
    before = snapshot(workspace["root"])
    code, err = run_cli(["train", "--set", f"data.data_dir={data}", "--set", "model=small_cnn",
                         "--set", f"run.storage_path={workspace['runs']}"], capsys)
    assert code == 2 and f"parquet='{data / 'train.parquet'}': not a readable Parquet file" in err, err
    assert snapshot(workspace["root"]) == before


def test_image_bytes_that_are_not_an_image_name_the_file_and_row(tmp_path):
    """A readable Parquet whose image bytes do not decode: the error names the file, row group and row,
    for training (build_dataset) and certification (load_images) inputs alike."""
    from PIL import Image

    from adre_ray.data import build_dataset, load_images

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="JPEG")
    _write_parquet(tmp_path / "test.parquet", [buffer.getvalue(), b"\x89PNG but not really", b"GIF8"])
    dataset = build_dataset("cifar10", tmp_path, "test", augment=False)
    assert dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"test\.parquet': row 1 of row group 0: image: bytes are not a "
                                         r"decodable image"):
        dataset[1]
    with pytest.raises(ValueError, match=r"test\.parquet': row 2 of row group 0"):
        load_images("cifar10", tmp_path, "test", [0, 2])


@pytest.mark.parametrize("problem, named", [
    pytest.param("classes", "num_classes=5 but the dataset has 10 classes", id="classes"),
    pytest.param("missing", "no such file or directory", id="missing"),
    pytest.param("not_a_checkpoint", "not a readable adre-ray model checkpoint", id="not_a_checkpoint"),
])
def test_certify_wrong_checkpoint_exits_2_and_writes_nothing(problem, named, workspace, checkpoints,
                                                             cifar10_dir, capsys):
    path = {"classes": checkpoints[5], "missing": workspace["root"] / "nope.pt",
            "not_a_checkpoint": workspace["root"] / "notes.pt"}[problem]
    if problem == "not_a_checkpoint":
        path.write_text("weights? no")
    before = snapshot(workspace["root"])
    code, err = run_cli(["certify", *certify_args(path, cifar10_dir, workspace["out"])], capsys)
    assert code == 2 and named in err and f"checkpoint='{path}'" in err, err
    assert snapshot(workspace["root"]) == before


def test_training_resume_refuses_a_checkpoint_of_another_architecture(checkpoints, tmp_path):
    """The loop's resume path checks the checkpoint's model name and class count against the config."""
    from adre_ray.distributed.train import _load_train_checkpoint

    folder = tmp_path / f"{CHECKPOINT_PREFIX}000003"
    folder.mkdir()
    (folder / "model.pt").write_bytes(checkpoints[10].read_bytes())
    cfg = load_config(TrainConfig, None, ["model=cifar_resnet20"])
    with pytest.raises(ValueError, match=r"model_name='small_cnn', expected_model='cifar_resnet20'"):
        _load_train_checkpoint(folder, build_model("cifar_resnet20", 10, "cifar10"), cfg)
    (folder / "model.pt").write_bytes(checkpoints[5].read_bytes())
    cfg = load_config(TrainConfig, None, ["model=small_cnn"])
    with pytest.raises(ValueError, match=r"num_classes=5, expected_num_classes=10"):
        _load_train_checkpoint(folder, build_model("small_cnn", 10, "cifar10"), cfg)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zero_bytes"])
def test_corrupt_result_part_is_named_and_left_untouched(damage, workspace, checkpoints, cifar10_dir, capsys):
    """A damaged part in the output folder stops the run (exit 2) naming the file; the file keeps its
    exact bytes, no other file changes, no part is added: it is never overwritten or skipped."""
    out = workspace["out"]
    good = part_files(out)[0]
    victim = out / "part-000000500-0123456789abcdef0123456789abcdef.parquet"
    victim.write_bytes({"garbage": b"PAR1 this is not parquet PAR1",
                        "truncated": good.read_bytes()[: good.stat().st_size // 2],
                        "zero_bytes": b""}[damage])
    before = snapshot(workspace["root"])
    code, err = run_cli(["certify", *certify_args(checkpoints[10], cifar10_dir, out)], capsys)
    assert code == 2 and f"result part '{victim}' is corrupt or unreadable" in err, err
    assert snapshot(workspace["root"]) == before


def test_console_script_exit_code(tmp_path):
    """The installed ``adre-ray`` script, in a fresh process, exits 2 with the message on stderr (the cases
    above call the same ``adre_ray.cli.main`` in-process)."""
    script = Path(sys.executable).parent / "adre-ray"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([str(script), "train", "--set", "loss.k=0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "adre-ray train: error: loss.k=0: must be an integer >= 1" in done.stderr
    assert list(tmp_path.iterdir()) == []


# -- 4. bound properties not covered by tests/test_bound_properties.py ----------------------------------

PROPERTY = settings(derandomize=True, max_examples=80, deadline=None)


@PROPERTY
@given(st.integers(min_value=1, max_value=100_000).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=0, max_value=n - 1))),
    st.floats(min_value=1e-6, max_value=0.5))
def test_pA_lower_non_decreasing_in_nA(n_and_nA, alpha):
    n, nA = n_and_nA
    assert pA_lower(nA + 1, n, alpha) >= pA_lower(nA, n, alpha)


@st.composite
def pilot_and_counts(draw) -> tuple[np.ndarray, np.ndarray, int]:
    """Pilot counts whose top class is 0 (any shape, so the pilot mode's choice of t varies), main counts
    with a donor class holding at least one count."""
    classes = draw(st.integers(min_value=2, max_value=10))
    pilot = np.array(draw(st.lists(st.integers(0, 40), min_size=classes, max_size=classes)))
    pilot[0] = pilot.max() + draw(st.integers(1, 60))
    counts = np.array(draw(st.lists(st.integers(0, 300), min_size=classes, max_size=classes)))
    donor = draw(st.integers(min_value=1, max_value=classes - 1))
    counts[donor] += 1
    counts[0] += draw(st.integers(0, 2000))
    return pilot, counts, donor


@PROPERTY
@given(pilot_and_counts(), st.floats(min_value=1e-4, max_value=0.2), st.sampled_from(["bonferroni", "pilot"]))
def test_valid_modes_radius_non_decreasing_in_nA(case, alpha, mode):
    """test_bound_properties covers CERTIFY and mode paper; the provably valid modes obey it too: moving
    one count from another class to cA raises pA_lower and lowers pB_upper at every split a'."""
    pilot, counts, donor = case
    moved = counts.copy()
    moved[donor] -= 1
    moved[0] += 1
    before = tcertify_counts(pilot, counts, 0.5, alpha, mode=mode)
    after = tcertify_counts(pilot, moved, 0.5, alpha, mode=mode)
    assert after.radius >= before.radius
    assert certify_counts(pilot, moved, 0.5, alpha).radius >= certify_counts(pilot, counts, 0.5, alpha).radius
