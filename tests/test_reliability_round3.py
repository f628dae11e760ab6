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
from conftest import fresh_mlflow_db

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
    # 50 images: not 100 (with the copy) nor 150
    assert [s["metrics"]["certify/num_images"] for s in summary.values()] == [50.0]
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


# ------------------------------------------------ 3. published logs: nothing trusted that can be checked

LOG_HEADER_LINE = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def _log(tmp_path: Path, *lines: str, header: str = LOG_HEADER_LINE, name: str = "log.tsv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.mark.parametrize(("line", "message"), [
    ("3\t4\t-1\t0.7\t1\t1.0", "line 3: correct=1 contradicts predict=-1, label=4"),  # abstention "correct"
    ("3\t4\t5\t0.7\t1\t1.0", "line 3: correct=1 contradicts predict=5, label=4"),
    ("3\t4\t4\t0.7\t0\t1.0", "line 3: correct=0 contradicts predict=4, label=4"),
    ("3\t4\t4\tinf\t1\t1.0", "line 3: radius='inf' must be a finite number >= 0"),
    ("3\t4\t4\tnan\t1\t1.0", "line 3: radius='nan' must be a finite number >= 0"),
    ("3\t4\t4\t-0.1\t1\t1.0", "line 3: radius='-0.1' must be a finite number >= 0"),
    ("3\t4\t-1\t0.7\t0\t1.0", "line 3: radius='0.7' on an abstention (predict -1) must be 0"),
])
def test_analyze_refuses_log_rows_whose_correct_or_radius_cannot_be_true(tmp_path, capsys, line, message):
    """Before: ``predict -1, radius 0.7, correct 1`` counted as certified-correct (and as abstained), and
    ``radius inf`` gave 100 % at every radius."""
    log = _log(tmp_path, "0\t3\t3\t0.5\t1\t1.0", line)
    code = cli.main(["analyze", str(log), "--output-dir", str(tmp_path / "a"), "--no-log-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and f"log '{log}' {message}" in err, err
    assert not (tmp_path / "a").exists()


def test_log_columns_are_read_by_header_name_in_any_order_with_extra_columns(tmp_path, capsys):
    """Before: another column order was 'corrupt Parquet', and Levine et al.'s extra columns were refused."""
    from adre_ray.analysis.published_logs import read_certify_log

    rows = [(0, 7, 7, 0.409, 1), (10, 0, 0, 0.42, 1), (250, 4, -1, 0.0, 0)]
    original = _log(tmp_path, *(f"{i}\t{y}\t{p}\t{r}\t{c}\t0:00:00.4" for i, y, p, r, c in rows),
                    name="a.tsv")
    shuffled = _log(tmp_path, *(f"0:00:00.4\t{c}\t{r}\t{p}\t{y}\t{i}" for i, y, p, r, c in rows),
                    header="time\tcorrect\tradius\tpredict\tlabel\tidx", name="b.tsv")
    levine = _log(tmp_path, *(f"{i}\t{y}\t{p}\t{r}\t95126\t0.94912\t{c}\t0:00:00.4"
                              for i, y, p, r, c in rows),
                  header="idx\tlabel\tpredict\tradius\traw_count\tp_A_bar\tcorrect\ttime", name="c.tsv")
    reference = read_certify_log(original)
    for log in (shuffled, levine):
        read = read_certify_log(log)
        assert read.drop_columns(["checkpoint"]).equals(reference.drop_columns(["checkpoint"]))
    assert cli.main(["analyze", str(levine), "--output-dir", str(tmp_path / "a"), "--no-log-mlflow"]) == 0
    wrong = _log(tmp_path, "0\t7\t7\t0.4\t1\t1.0", header="idx\tlabel\tprediction\tradius\tcorrect\ttime",
                 name="d.tsv")
    assert cli.main(["analyze", str(wrong), "--output-dir", str(tmp_path / "b"), "--no-log-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "first line must be a header naming the columns 'idx label predict radius correct time' (any " \
           "order, other columns allowed); missing predict" in err, err


_MEASURE = """
import sys
from pathlib import Path
from adre_ray.analysis import plots, report  # imports (matplotlib, pyarrow) are not part of the peak
Path('/proc/self/clear_refs').write_text('5')  # Linux: reset the peak resident size (VmHWM) to now
base = Path('/proc/self/status').read_text()
code = report.main([sys.argv[1], '--output-dir', sys.argv[2], '--no-log-mlflow'])
def kib(status, key):
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(key)))
print(code, (kib(Path('/proc/self/status').read_text(), 'VmHWM:') - kib(base, 'VmRSS:')) * 1024)
"""


def test_analyze_of_a_big_log_uses_memory_linear_in_its_rows_with_a_small_constant(tmp_path):
    """Before: 1,000,000 rows took 2.6 GB (Python objects per value, an N x grid matrix), ~2,900 bytes
    per row here. A RESULT_SCHEMA row is ~250 bytes in Arrow (31 columns of <= 8 bytes); the bound allows
    four times that for the working arrays of the read and the metrics."""
    import random

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    rows = 200_000
    rng = random.Random(0)
    log = tmp_path / "big.tsv"
    with open(log, "w") as handle:
        handle.write(LOG_HEADER_LINE + "\n")
        for i in range(rows):
            label = rng.randrange(10)
            predict = label if rng.random() < 0.7 else -1
            radius = round(rng.random(), 3) if predict >= 0 else 0.0
            handle.write(f"{i}\t{label}\t{predict}\t{radius}\t{int(predict == label)}\t0:00:01.234567\n")
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(log), str(tmp_path / "a")], env=ENV,
                          capture_output=True, text=True, timeout=600)
    code, grown = done.stdout.split()[-2:]
    assert code == "0", done.stderr
    assert int(grown) < 1_000 * rows, f"{int(grown) / rows:.0f} bytes per row"


# ------------------------------------------------------------ 4. convert decodes every image fully


def test_convert_refuses_a_truncated_jpeg_naming_it(tmp_path):
    """Before: ``img.verify()`` passed a JPEG cut to its first 1000 bytes; training failed later with
    "image file is truncated"."""
    import io

    import numpy as np
    from PIL import Image

    from adre_ray.data.convert import plan_conversion, write_shard

    src = tmp_path / "src"
    for label, name in enumerate(("cat", "dog")):
        (src / "train" / name).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(10 * label + i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
            (src / "train" / name / f"{i}.JPEG").write_bytes(buffer.getvalue())
    bad = src / "train" / "dog" / "1.JPEG"
    bad.write_bytes(bad.read_bytes()[:1000])  # head -c 1000
    with Image.open(bad) as img:
        img.verify()  # the old check passes it
    (plan,) = plan_conversion(src, rows_per_file=2)
    outcomes = {}
    for shard in plan.shards:
        try:
            outcomes[shard.name] = write_shard(shard, plan.folder, plan.class_names, tmp_path / "dst",
                                               rows_per_group=2)
        except ValueError as err:
            outcomes[shard.name] = str(err)
    failed = [o for o in outcomes.values() if o != "written"]
    assert len(failed) == 1 and f"src='{bad}': not a readable image" in failed[0] and "truncated" in failed[0]
    written = sorted(p.name for p in (tmp_path / "dst" / "train").iterdir())
    assert written == sorted(name for name, o in outcomes.items() if o == "written")  # no temp file left


# ------------------------------------------------------------------- import-checkpoint refusals


@pytest.mark.parametrize("sigma", ["inf", "nan", "0", "-0.25", "1e308"])
def test_import_checkpoint_refuses_a_sigma_certify_would_refuse(tmp_path, capsys, sigma):
    """Before: ``--sigma inf`` was written into the checkpoint; certify refused it later, after Ray."""
    from test_import_checkpoint import original_cifar, save_original

    src = save_original(tmp_path / "src.pth.tar", original_cifar(), "cifar_resnet20")
    code = cli.main(["import-checkpoint", str(src), "--format", "smoothing", "--dataset", "cifar10",
                     "--output", str(tmp_path / "out.pt"), "--sigma", sigma])
    err = capsys.readouterr().err
    assert code == 2 and f"--sigma={float(sigma)!r}: must be a finite number in (0, " in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth.tar"]


@pytest.mark.parametrize("below", ["parent", "grandparent"])
def test_import_checkpoint_refuses_an_output_below_a_file(tmp_path, capsys, below):
    """Before: a traceback (NotADirectoryError) and exit 1."""
    from test_import_checkpoint import original_cifar, save_original

    src = save_original(tmp_path / "src.pth.tar", original_cifar(), "cifar_resnet20")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    output = blocker / "model.pt" if below == "parent" else blocker / "sub" / "model.pt"
    code = cli.main(["import-checkpoint", str(src), "--format", "smoothing", "--dataset", "cifar10",
                     "--output", str(output), "--sigma", "0.25"])
    err = capsys.readouterr().err
    assert code == 2 and f"--output='{output}': '{blocker}' is a file" in err, err
    assert "Traceback" not in err and blocker.read_text() == "a file"


# ------------------------------------------------------------- object-store writes: named, whole


@pytest.fixture()
def s3_server(monkeypatch):
    """A moto S3 server with one bucket, ``adre-ok``; the AWS_* variables point at it."""
    import socket

    import pyarrow.fs as pafs

    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("adre-ok")
    yield endpoint
    server.stop()


def test_a_failed_object_write_names_the_object_and_a_large_part_arrives_whole(s3_server):
    """Before: ``cannot write 'output'``. A 12 MB object goes as a multipart upload and is read back whole."""
    from adre_ray import storage
    from adre_ray.distributed._common import os_error_message

    target = "s3://no-such-bucket/results/part-000000000-x.parquet"
    with pytest.raises(OSError) as caught:
        storage.write_bytes_atomic(target + "?region=us-east-1", b"rows")
    assert caught.value.filename == target
    assert os_error_message(caught.value).startswith(f"cannot write '{target}': ")
    big = os.urandom(12 << 20)
    storage.write_bytes_atomic("s3://adre-ok/results/big.parquet", big)
    assert storage.read_bytes("s3://adre-ok/results/big.parquet") == big
    assert storage.list_files("s3://adre-ok/results") == ["big.parquet"]


# ------------------------------------------------ a result folder is a Parquet dataset; old ones resume


def test_a_result_folder_is_a_parquet_dataset_and_an_old_folder_still_resumes(tmp_path):
    """Before: ``pd.read_parquet(folder)`` failed on ``run.json`` / ``mlflow_run.json`` beside the parts."""
    import json

    import pandas as pd
    import pyarrow.dataset as ds

    from adre_ray.analysis.output_folder import output_folder_lock
    from adre_ray.analysis.results import check_manifest_settings, read_manifest, read_results
    from adre_ray.distributed.certify import previous_certify_run, record_certify_run

    folder = _result_folder(tmp_path / "new", "/m.pt", range(7))
    uri = fresh_mlflow_db(tmp_path / "mlflow.db")
    record_certify_run(folder, uri, "0123abcd")
    with output_folder_lock(folder):  # the lock file is there while a run writes
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("part-")) == [
            ".adre_ray.lock", "_mlflow_run.json", "_run.json"]
        assert sorted(ds.dataset(folder).to_table().column("idx").to_pylist()) == list(range(7))
        assert sorted(pd.read_parquet(folder)["idx"]) == list(range(7))

    old = tmp_path / "old"  # the layout of earlier versions: run.json, mlflow_run.json
    old.mkdir()
    for part in folder.glob("part-*"):
        (old / part.name).write_bytes(part.read_bytes())
    (old / "run.json").write_text((folder / "_run.json").read_text())
    (old / "mlflow_run.json").write_text(json.dumps({"tracking_uri": "none", "run_id": "x"}))
    settings = {k: v for k, v in read_manifest(folder).items() if k != "schema_version"}
    assert read_manifest(old) == read_manifest(folder)
    assert check_manifest_settings(old, settings) is True  # a resume, not a new run
    assert read_results(old).equals(read_results(folder))
    assert previous_certify_run(old, "none") is None and not (old / "_run.json").exists()


# ------------------------------------------------------------------------- --help is instant

_HELP_IMPORTS = """
import contextlib, io, json, sys
from adre_ray import cli
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        code = cli.main([sys.argv[1], "--help"])
    except SystemExit as exit_:
        code = exit_.code
heavy = ("torch", "torchvision", "ray", "mlflow", "matplotlib")
print(json.dumps([code, "usage: adre-ray " + sys.argv[1] in out.getvalue(),
                  sorted(m for m in heavy if m in sys.modules)]))
"""


def test_every_commands_help_imports_no_torch_ray_mlflow_or_matplotlib():
    """Before: ``adre-ray certify --help`` imported torch and torchvision (7.5 s); tune, convert and
    import-checkpoint too, analyze matplotlib."""
    import json

    seen = {}
    for command in cli.COMMANDS:
        done = subprocess.run([sys.executable, "-c", _HELP_IMPORTS, command], env=ENV, capture_output=True,
                              text=True, timeout=600)
        seen[command] = json.loads(done.stdout.strip().splitlines()[-1])
    assert {command: value for command, value in seen.items() if value != [0, True, []]} == {}


# ----------------------------------------------------------------------------------------- demo


def test_demo_table_stops_at_the_largest_certifiable_radius():
    """Before: columns up to 3.00, which n = 1,000 draws can never certify (the largest is 0.615)."""
    from scipy.stats import norm

    from adre_ray.config.demo import DemoConfig
    from adre_ray.demo import largest_certifiable_radius, table_radii
    from adre_ray.smoothing.certify import certify_counts, tcertify_counts

    cfg = DemoConfig()
    radii, top = table_radii(cfg)
    assert top == pytest.approx(cfg.sigma * norm.ppf(cfg.alpha ** (1 / cfg.n)))
    assert radii == [0.0, 0.25, 0.5] and 0.5 <= top < 0.75
    counts = [cfg.n] + [0] * 9  # every draw for one class: the largest radius CERTIFY can give
    assert certify_counts(counts, counts, cfg.sigma, cfg.alpha).radius == pytest.approx(top)
    for mode in ("paper", "bonferroni", "pilot"):
        assert tcertify_counts(counts, counts, cfg.sigma, cfg.alpha, mode=mode).radius <= top + 1e-12
    assert largest_certifiable_radius(0.5, 100_000, 0.001) > 1.9


def test_demo_prints_a_line_per_finished_epoch_while_training_runs(tmp_path, capsys):
    """Before: nothing for minutes while training (the workers' lines were not shown)."""
    import time

    from adre_ray.demo import EpochProgress
    from adre_ray.tracking import log_metrics, mlflow_run

    uri = fresh_mlflow_db(tmp_path / "mlflow.db")
    with EpochProgress("ADRE_REG", "demo_adre_reg", "adre-demo", uri, epochs=3, interval=0.2) as progress, \
            mlflow_run("adre-demo", "demo_adre_reg", tracking_uri=uri) as run:
        for epoch in range(2):
            log_metrics({"test_acc_noise": 0.25 + epoch / 10}, step=epoch, run_id=run.info.run_id,
                        tracking_uri=uri)
            deadline = time.monotonic() + 120
            while epoch not in progress.shown and time.monotonic() < deadline:  # printed while running
                time.sleep(0.1)
            assert epoch in progress.shown
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo] ADRE_REG")]
    assert [line.split(" (")[0] for line in lines] == [
        "[demo] ADRE_REG: epoch 1/3 done, test accuracy under noise 0.250",
        "[demo] ADRE_REG: epoch 2/3 done, test accuracy under noise 0.350"]


def test_readme_and_demo_help_give_one_run_time_and_demo_output_is_ignored(capsys):
    from adre_ray.demo import RUN_TIME, build_parser

    build_parser().print_help()
    assert RUN_TIME in " ".join(capsys.readouterr().out.split())
    assert RUN_TIME in " ".join((REPO / "README.md").read_text().split())
    assert "/demo_output/" in (REPO / ".gitignore").read_text().split()
