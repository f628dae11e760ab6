"""Reliability, round 2 (issue 16): no certificate from non-finite logits or wrongly sized images, jobs that
do not interfere (private Ray clusters, an output-folder lock), nothing that hangs (actors above capacity),
clean interrupts and unwritable outputs, MLflow run states on resume, Tune restore, strict ``analyze``.

Each test here failed before its fix (see docs/reliability.md, "What was tried").
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import fresh_mlflow_db
from PIL import Image

from adre_ray import cli
from adre_ray.analysis.results import part_files, read_results
from adre_ray.models import build_model, save_model_checkpoint
from adre_ray.smoothing import NonFiniteLogitsError, sample_counts

REPO = Path(__file__).resolve().parents[1]


def certify_args(checkpoint: Path, data_dir: Path, out: Path, **more: object) -> list[str]:
    settings = {"checkpoint": checkpoint, "data_dir": data_dir, "output_dir": out, "sigma": 0.25, "n0": 32,
                "n": 64, "max_images": 2, "progress": "false", "shard_size": 32, **more}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A finite 10-class small_cnn checkpoint and the same with every weight NaN."""
    root = tmp_path_factory.mktemp("ckpts16")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10")
    saved = {"good": save_model_checkpoint(root / "good.pt", model, model_name="small_cnn", num_classes=10,
                                           dataset="cifar10", extra={"sigma": 0.25})}
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    saved["nan"] = save_model_checkpoint(root / "nan.pt", model, model_name="small_cnn", num_classes=10,
                                         dataset="cifar10", extra={"sigma": 0.25})
    return saved


# ------------------------------------------------------------------------------ 1. non-finite logits


class _OneBadDraw(torch.nn.Module):
    """Finite logits except for one draw (row ``bad_row`` of the second batch), which gets +inf / NaN."""

    def __init__(self, value: float, bad_row: int = 3) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.value, self.bad_row, self.calls = value, bad_row, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 0] = 1.0
        if self.calls == 1:
            logits[self.bad_row, 4] = self.value
        self.calls += 1
        return logits


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_sampler_refuses_a_single_non_finite_logit(value):
    x = torch.rand(3, 8, 8)
    with pytest.raises(NonFiniteLogitsError, match=r"1 of 128 draws gave a NaN or infinite logit"):
        sample_counts(_OneBadDraw(value).eval(), x, 128, 10, 0.25, batch_size=64)
    counts = sample_counts(_OneBadDraw(1.0).eval(), x, 128, 10, 0.25, batch_size=64)  # control: finite
    assert counts.tolist() == [128] + [0] * 9


class _Logits(torch.nn.Module):
    """Returns ``rows`` (cycled over the batch) as logits."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.rows = torch.tensor(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows.repeat(x.shape[0] // len(self.rows) + 1, 1)[:x.shape[0]]


def test_non_finite_check_counts_each_bad_row_and_passes_huge_finite_logits():
    """On CPU the per-logit check runs only when a batch's sum is not finite: +inf and -inf in two rows sum
    to NaN (both counted); finite logits whose sum overflows are still counted as draws."""
    x = torch.rand(3, 8, 8)
    with pytest.raises(NonFiniteLogitsError, match=r"64 of 128 draws gave"):
        sample_counts(_Logits([[float("inf"), 0.0], [1.0, 0.0], [0.0, float("-inf")], [1.0, 0.0]]).eval(), x,
                      128, 2, 0.25, batch_size=64)
    huge = _Logits([[3e38, 1e38], [1e38, 3e38]]).eval()  # every batch's sum overflows to inf
    assert sample_counts(huge, x, 128, 2, 0.25, batch_size=64).tolist() == [64, 64]


def test_nan_weights_fail_the_job_naming_the_checkpoint(ray_cluster, small_checkpoints, cifar10_dir, tmp_path,
                                                        capsys, monkeypatch):
    """Before: every draw's argmax was class 0, so class-0 images were 'certified'. Now: exit 2 naming the
    checkpoint, and no row is written."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    code = cli.main(["certify", *certify_args(small_checkpoints["nan"], cifar10_dir, out, num_actors=1)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"checkpoint='{small_checkpoints['nan']}'" in err and "NaN or infinite logit" in err, err
    assert "Traceback" not in err
    assert part_files(out) == []


# ------------------------------------------------------------------------------- 2. image shape check


def _png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _cifar_layout(folder: Path, sizes: list[int]) -> Path:
    """``folder/test.parquet`` in the CIFAR-10 layout (PNG bytes + label), row groups of 2 rows."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": pa.array([_png(s, i) for i, s in enumerate(sizes)], pa.binary()),
                      "label": pa.array([i % 10 for i in range(len(sizes))], pa.int64())})
    pq.write_table(table, folder / "test.parquet", row_group_size=2)
    return folder / "test.parquet"


@pytest.mark.parametrize("sizes, bad_row", [([64, 64, 64, 64], 0), ([32, 32, 32, 64, 32], 3)],
                         ids=["all_64x64", "mixed_sizes"])
def test_image_of_another_size_is_refused_naming_file_row_group_and_row(tmp_path, sizes, bad_row):
    from adre_ray.data import load_images

    path = _cifar_layout(tmp_path / "data", sizes)
    group, row = divmod(bad_row, 2)
    with pytest.raises(ValueError, match=rf"parquet='{path}': row {row} of row group {group} \(image idx "
                                         rf"{bad_row}\): image shape \(3, 64, 64\).*\(3, 32, 32\)"):
        load_images("cifar10", tmp_path / "data", "test", list(range(len(sizes))))
    good = [i for i, s in enumerate(sizes) if s == 32]
    if good:  # control: the 32x32 rows of the same file load
        pixels, _ = load_images("cifar10", tmp_path / "data", "test", good)
        assert tuple(pixels.shape) == (len(good), 3, 32, 32)


def test_certify_refuses_a_64x64_image_before_sampling_it(ray_cluster, small_checkpoints, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = _cifar_layout(tmp_path / "data", [64, 32])
    out = tmp_path / "out"
    code = cli.main(["certify", *certify_args(small_checkpoints["good"], tmp_path / "data", out,
                                              num_actors=1, skip=1)])
    err = capsys.readouterr().err
    assert code == 2 and f"parquet='{path}': row 0 of row group 0" in err and "(3, 64, 64)" in err, err
    assert part_files(out) == []


# ------------------------------------------------------------------------------ 3. jobs that interfere


def _job_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a job started as a user would: no RAY_ADDRESS, this worktree's code, and Ray's
    temp dir private to the test (so a `ray start` cluster of some other process is not this test's)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="r16", dir="/tmp"))
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    return env


def _certify_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adre_ray.cli", "certify", *args], cwd=log.parent, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_certify_jobs_at_once_both_finish_with_all_their_images(small_checkpoints, cifar10_dir, tmp_path):
    """Before: the second job joined the first job's private cluster (``ray.init(address="auto")``) and died
    with exit 1 when the first finished and shut it down. Now each starts its own."""
    env = _job_env(tmp_path)
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    images = {"a": 2, "b": 5}
    def args(name: str) -> list[str]:
        return certify_args(small_checkpoints["good"], cifar10_dir, outs[name], num_actors=1,
                            max_images=images[name], tracking_uri="none")

    first = _certify_process(args("a"), env, tmp_path / "a.log")
    jobs = {"a": first}
    try:
        deadline = time.monotonic() + 240
        while not (outs["a"] / "_run.json").exists():  # written once job a has its Ray cluster
            assert first.poll() is None, (tmp_path / "a.log").read_text()
            assert time.monotonic() < deadline, "job a did not start"
            time.sleep(0.5)
        jobs["b"] = _certify_process(args("b"), env, tmp_path / "b.log")
        for name, proc in jobs.items():
            assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()
    finally:
        for proc in jobs.values():  # a failed wait leaves no job behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, out in outs.items():
        assert sorted(read_results(out).column("idx").to_pylist()) == [20 * i for i in range(images[name])]


# ---------------------------------------------------------------------------- 4. output-folder lock

_HOLD_LOCK = ("import sys, time\n"
              "from adre_ray.analysis.output_folder import output_folder_lock\n"
              "with output_folder_lock(sys.argv[1]):\n"
              "    print('locked', flush=True)\n"
              "    time.sleep(600)\n")


def _lock_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_output_folder_lock_names_its_holder_and_a_sigkill_never_leaves_it_stuck(tmp_path):
    from adre_ray.analysis.output_folder import LOCK_NAME, OutputFolderBusyError, output_folder_lock

    folder = tmp_path / "out"
    holder = _lock_holder(folder)
    try:
        busy = rf"output_dir='{folder}': in use by another run \(pid {holder.pid} on "
        with pytest.raises(OutputFolderBusyError, match=busy), output_folder_lock(folder):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait()
    assert (folder / LOCK_NAME).exists()  # the stale file stays, but the OS released the lock
    with output_folder_lock(folder) as path:
        assert f'"pid": {os.getpid()}' in path.read_text()
    assert not (folder / LOCK_NAME).exists()  # a clean release removes the file


def test_second_certify_into_a_busy_folder_is_refused_naming_the_holder(ray_cluster, small_checkpoints,
                                                                       cifar10_dir, tmp_path, capsys):
    """Before: both runs certified every image, and the duplicate parts blocked every later run."""
    out = tmp_path / "out"
    holder = _lock_holder(out)
    try:
        code = cli.main(["certify", *certify_args(small_checkpoints["good"], cifar10_dir, out, num_actors=1,
                                                  tracking_uri="none")])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by another run (pid {holder.pid} on" in err, err
        assert part_files(out) == [] and not (out / "_run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    code = cli.main(["certify", *certify_args(small_checkpoints["good"], cifar10_dir, out, num_actors=1,
                                              tracking_uri="none")])
    assert code == 0 and len(read_results(out)) == 2


# --------------------------------------------------------------------------- 5. actors above capacity


def test_more_actors_than_the_cluster_has_are_refused_at_once(ray_cluster, small_checkpoints, cifar10_dir,
                                                             tmp_path, capsys):
    """Before: ``--actors 3`` on 2 CPUs waited forever without a word."""
    out = tmp_path / "out"
    began = time.monotonic()
    args = certify_args(small_checkpoints["good"], cifar10_dir, out, tracking_uri="none", resource_wait_s=2)
    code = cli.main(["certify", *args, "--actors", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "num_actors=3: the Ray cluster has 2 CPUs in all (waited 2 s)" in err, err
    assert "waiting up to 2 s for 3 free CPU(s)" in err
    assert time.monotonic() - began < 60 and part_files(out) == []


def test_actors_held_by_another_job_are_waited_for_then_refused(ray_cluster, small_checkpoints, capsys):
    """Both CPUs held (as by another job's actors): the pool size waits visibly, then refuses."""
    from adre_ray.config import load_config
    from adre_ray.config.certify import CertifyConfig
    from adre_ray.distributed.certify import _pool_size

    @ray_cluster.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    holders = [Holder.remote() for _ in range(2)]
    ray_cluster.get([h.ready.remote() for h in holders])
    try:
        for actors in (None, 1):
            cfg = load_config(CertifyConfig, None, [f"checkpoint={small_checkpoints['good']}",
                                                    f"num_actors={'null' if actors is None else actors}",
                                                    "resource_wait_s=1"])
            with pytest.raises(ValueError, match=rf"num_actors={actors}: only 0 of the cluster's 2 CPUs are "
                                                 r"free"):
                _pool_size(cfg, use_gpu=False)
            assert "waiting up to 1 s for 1 free CPU(s) (0 of 2 free now)" in capsys.readouterr().err
    finally:
        for holder in holders:
            ray_cluster.kill(holder)
        _wait_until_all_cpus_free(ray_cluster)


def _wait_until_all_cpus_free(ray_module, timeout_s: float = 60.0) -> None:
    """Block until the shared test cluster's CPUs are all free again (a killed actor frees its CPU a
    little later), so the next test does not see them held."""
    deadline = time.monotonic() + timeout_s
    total = ray_module.cluster_resources().get("CPU", 0)
    while ray_module.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, f"CPUs still held: {ray_module.available_resources()}"
        time.sleep(0.5)


# ------------------------------------------------------------------ 6. Ctrl-C, unwritable output paths


def test_ctrl_c_prints_one_line_exits_130_and_the_same_command_resumes(ray_cluster, small_checkpoints,
                                                                        cifar10_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """Before: a 20-line traceback. Ctrl-C is raised where a real one lands: in the driver's loop, after
    the first part is written."""
    from adre_ray.distributed import certify as certify_mod

    def ctrl_c(path: Path) -> None:
        raise KeyboardInterrupt

    args = ["certify", *certify_args(small_checkpoints["good"], cifar10_dir, tmp_path / "out", num_actors=1,
                                     max_images=3, flush_images=1, tracking_uri="none")]
    with monkeypatch.context() as patch:
        patch.setattr(certify_mod, "CertifyHooks", _hooks_class(certify_mod.CertifyHooks, ctrl_c))
        assert cli.main(args) == 130
    err = capsys.readouterr().err
    # the pool may first have announced a wait for CPUs an earlier test's actors still held (its own line)
    lines = [line for line in err.strip().splitlines() if not line.startswith("adre-ray certify: waiting ")]
    assert lines == ["adre-ray certify: interrupted; re-run the same command to resume"]
    assert len(read_results(tmp_path / "out")) == 1
    assert cli.main(args) == 0
    assert sorted(read_results(tmp_path / "out").column("idx").to_pylist()) == [0, 20, 40]


def _hooks_class(hooks_class: type, on_part_written) -> type:
    class Interrupting(hooks_class):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(on_part_written=on_part_written)

    return Interrupting


@pytest.mark.parametrize("problem", ["is_a_file", "under_a_file"])
def test_output_path_that_cannot_be_a_folder_exits_2_before_ray(problem, small_checkpoints, cifar10_dir,
                                                                tmp_path, capsys, monkeypatch):
    """Tests run as root, for whom no folder is read-only; a path that is, or lies under, a regular file
    fails the same way (the check also tests write access and free space)."""
    from adre_ray.distributed import certify as certify_mod

    monkeypatch.setattr(certify_mod, "connect_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker if problem == "is_a_file" else blocker / "out"
    code = cli.main(["certify", *certify_args(small_checkpoints["good"], cifar10_dir, out)])
    err = capsys.readouterr().err
    assert code == 2 and f"output_dir='{out}'" in err, err
    assert ("is a file, not a folder" if problem == "is_a_file" else f"'{blocker}' is a file") in err
    assert blocker.read_text() == "a file"


def test_full_disk_while_writing_a_part_exits_2_naming_the_path(ray_cluster, small_checkpoints, cifar10_dir,
                                                                tmp_path, capsys, monkeypatch):
    import errno

    from adre_ray.distributed import certify as certify_mod

    def no_space(out_dir: Path, rows: list) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "part-x.parquet"))

    monkeypatch.setattr(certify_mod, "write_part", no_space)
    out = tmp_path / "out"
    code = cli.main(["certify", *certify_args(small_checkpoints["good"], cifar10_dir, out, num_actors=1,
                                              tracking_uri="none")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write '{out / 'part-x.parquet'}': No space left on device" in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------- 7. MLflow run states


def test_resumed_certification_continues_its_mlflow_run(ray_cluster, small_checkpoints, cifar10_dir,
                                                        tmp_path):
    """Before: each resume opened a new run of the same name, the interrupted one left behind; and its
    ``images_done`` restarted at 1, so steps 1, 2, ... were logged twice (issue 21)."""
    from mlflow.tracking import MlflowClient

    from adre_ray.config import load_config
    from adre_ray.config.certify import CertifyConfig
    from adre_ray.distributed.certify import MLFLOW_RUN_FILE, CertifyHooks, run_certification

    uri = fresh_mlflow_db(tmp_path / "mlflow.db")
    cfg = load_config(CertifyConfig, None, [
        f"checkpoint={small_checkpoints['good']}", f"data_dir={cifar10_dir}",
        f"output_dir={tmp_path / 'out'}", "sigma=0.25", "n0=32", "n=64", "max_images=3", "shard_size=32",
        "num_actors=1", "flush_images=1", "progress=false", f"tracking_uri={uri}", "experiment=certify16"])

    def stop(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_certification(cfg, hooks=CertifyHooks(on_part_written=stop))
    assert (tmp_path / "out" / MLFLOW_RUN_FILE).is_file()
    result = run_certification(cfg)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("certify16").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["certify/num_images"] == 3
    history = client.get_metric_history(result.mlflow_run_id, "images_done")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_an_epoch_run_again_after_a_restart_is_logged_once(tmp_path):
    """Before: rank 0 logged epoch e, the group restarted from the checkpoint of e - 1 (e's was not yet
    committed), and e was logged again: two points at one step."""
    from mlflow.tracking import MlflowClient

    from adre_ray.distributed.train import _log_epoch
    from adre_ray.tracking import mlflow_run

    uri = fresh_mlflow_db(tmp_path / "mlflow.db")
    with mlflow_run("train16", "r", tracking_uri=uri) as run:
        run_id = run.info.run_id
    metrics = {"epoch": 3, "loss": 1.0, "l_per": 1.0, "l_adre": 0.0, "train_acc_noise": 0.5,
               "test_acc_noise": 0.4, "test_acc_clean": 0.6, "images_per_s_total": 10.0}
    _log_epoch(metrics, run_id, uri)
    _log_epoch({**metrics, "loss": 0.9}, run_id, uri)  # the same epoch, trained again
    _log_epoch({**metrics, "epoch": 4, "loss": 0.8}, run_id, uri)
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(3, 1.0), (4, 0.8)]


def _train_config(storage: Path, name: str, overrides: list[str]):
    from adre_ray.config import load_config
    from adre_ray.config.train import TrainConfig

    base = ["model=small_cnn", f"run.name={name}", f"run.storage_path={storage}", "run.tracking_uri=none"]
    return load_config(TrainConfig, None, [*base, *overrides])


def _saved_training_run(storage: Path, name: str, overrides: list[str]):
    """A training run folder holding one complete checkpoint of the config ``overrides``."""
    from adre_ray.distributed.train import CHECKPOINT_PREFIX, TRAIN_STATE_FILENAME

    cfg = _train_config(storage, name, overrides)
    folder = storage / name / f"{CHECKPOINT_PREFIX}000000"
    folder.mkdir(parents=True)
    save_model_checkpoint(folder, build_model("small_cnn", 10, "cifar10"), model_name="small_cnn",
                          num_classes=10, dataset="cifar10", extra={"config": cfg.to_dict(), "epoch": 0})
    torch.save({"epoch": 0}, folder / TRAIN_STATE_FILENAME)
    return cfg


@pytest.mark.parametrize("change, named", [("loss.lam=0.5", "loss.lam=0.5"), ("model=cifar_resnet20",
                                           "model='cifar_resnet20'"), ("optim.lr=0.01", "optim.lr=0.01")])
def test_training_resumed_with_other_settings_is_refused_naming_the_field(ray_cluster, change, named,
                                                                          tmp_path):
    """Before: accepted silently, the MLflow params keeping the old values."""
    from adre_ray.distributed.train import check_resume_settings, latest_checkpoint, run_training

    cfg = _saved_training_run(tmp_path / "runs", "r16", ["loss.lam=0.2"])
    with pytest.raises(ValueError, match=rf"{named} differs from the run being resumed"):
        run_training(_train_config(tmp_path / "runs", "r16", ["loss.lam=0.2", change]), check_data=False)
    checkpoint = latest_checkpoint(str(tmp_path / "runs" / "r16"))
    for allowed in ({"schedule.epochs": 300}, {"scaling.num_workers": 4}, {"run.max_failures": 2},
                    {"data.data_dir": str(tmp_path)}):
        check_resume_settings(cfg.replace(**allowed), checkpoint, "here")  # allowed on resume


# --------------------------------------------------------------------- 10. fault injector in its module


def test_the_training_module_defines_no_fault_machinery():
    """Before: ``FaultKill`` and its helpers lived in adre_ray/distributed/train.py. Now train.py only
    calls the two documented hooks of adre_ray/distributed/faults.py."""
    import ast

    from adre_ray.distributed import faults, train

    tree = ast.parse(Path(train.__file__).read_text())
    defined = {node.name for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
    moved = {"FaultKill", "_KillBeforeBatch", "fault_worker_env", "_wait_for_reports_collected"}
    assert not defined & moved, defined & moved
    assert train.FaultKill is faults.FaultKill and train.fault_worker_env is faults.fault_worker_env
    assert "FAULT_KILL_ENV" not in vars(train)


# ------------------------------------------------------------------------- 9. analyze refuses mixtures


def _analysis_row(idx: int, **changes: object) -> dict:
    counts = [1] * 10
    counts[0] = 991
    row = {"idx": idx, "label": 0, "predict": 0, "correct": True, "correct_tcertify": True,
           "certify_predict": 0, "tcertify_predict": 0, "radius_certify": 0.5, "radius_tcertify": 0.6,
           "tcertify_mode": "pilot", "pA_lower": 0.9, "pB_upper": 0.05, "alpha_prime": 0.001,
           "pA_lower_certify": 0.9, "counts": counts, "pilot_counts": counts, "n0": 1000, "n": 1000,
           "alpha": 0.001, "sigma": 0.25, "seed": 0, "time_s": 0.1, "checkpoint": "c.pt", "train_run_id": ""}
    return {**row, **changes}


@pytest.mark.parametrize("second, named", [({"sigma": 0.5}, "rows mix sigma=0.25, sigma=0.5"),
                                           ({"n": 500}, "rows mix n=1000, n=500")])
def test_analyze_refuses_a_folder_mixing_settings(second, named, tmp_path, capsys):
    """Before: rows of sigma 0.25 and 0.5 were averaged into one curve."""
    from adre_ray.analysis.report import main as analyze
    from adre_ray.analysis.results import write_part

    counts = list(second.values())[0]
    rows = [_analysis_row(i) for i in range(2)] + [_analysis_row(2, **second)]
    if "n" in second:
        rows[2]["counts"] = [counts - 9] + [1] * 9
    write_part(tmp_path / "mixed", rows)
    assert analyze([str(tmp_path / "mixed"), "--output-dir", str(tmp_path / "report")]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_analyze_reads_a_shortcut_folder_whose_rows_made_fewer_draws(tmp_path, capsys):
    """A shortcut row's n is the draws it made (0 skipped, fewer stopped early or by ISS): not a second
    setting. The folder analyzes, its table names the run's n, and a real mix of n is still refused."""
    import json

    from adre_ray.analysis.report import main as analyze
    from adre_ray.analysis.results import SCHEMA_VERSION, write_part

    skipped = _analysis_row(1, n=0, counts=[0] * 10, correct=False, correct_tcertify=False,
                            certify_predict=-1, tcertify_predict=-1, radius_certify=0.0,
                            radius_tcertify=0.0, shortcut="skipped_misclassified", samples_used=1000)
    stopped = _analysis_row(2, n=200, counts=[191] + [1] * 9, correct=False, correct_tcertify=False,
                            certify_predict=-1, tcertify_predict=-1, radius_certify=0.0,
                            radius_tcertify=0.0, shortcut="early_abstain", samples_used=1200)
    folder = tmp_path / "shortcuts"
    write_part(folder, [_analysis_row(0), skipped, stopped])
    manifest = {"sigma": 0.25, "n0": 1000, "n": 1000, "alpha": 0.001, "mode": "pilot",
                "schema_version": SCHEMA_VERSION}
    (folder / "run.json").write_text(json.dumps(manifest))
    assert analyze([str(folder), "--output-dir", str(tmp_path / "report")]) == 0, capsys.readouterr().err
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| 1000 |" in table and "0/1000" not in table and "200" not in table.split("\n")[2]
    write_part(folder, [_analysis_row(3, n=500, counts=[491] + [1] * 9)])  # a full row of another n
    assert analyze([str(folder), "--output-dir", str(tmp_path / "report2")]) == 2
    assert "rows mix n=1000, n=500" in capsys.readouterr().err


def test_analyze_refuses_an_unknown_newer_schema_and_rows_that_contradict_run_json(tmp_path, capsys):
    """Before: a newer writer's folder was read as 0 % certified."""
    import json

    from adre_ray.analysis.report import main as analyze
    from adre_ray.analysis.results import SCHEMA_VERSION, write_part

    newer = SCHEMA_VERSION + 7
    write_part(tmp_path / "new", [_analysis_row(0, schema_version=newer)])
    assert analyze([str(tmp_path / "new"), "--output-dir", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert f"schema_version={newer}, newer than this adre-ray reads ({SCHEMA_VERSION})" in err, err

    folder = tmp_path / "manifest"
    write_part(folder, [_analysis_row(0)])
    manifest = {"sigma": 0.25, "n0": 1000, "n": 1000, "alpha": 0.001, "mode": "pilot"}
    (folder / "run.json").write_text(json.dumps({**manifest, "schema_version": newer}))
    assert analyze([str(folder), "--output-dir", str(tmp_path / "r2")]) == 2
    assert f"run.json: schema_version={newer} is newer" in capsys.readouterr().err
    (folder / "run.json").write_text(json.dumps({**manifest, "sigma": 0.5, "schema_version": SCHEMA_VERSION}))
    assert analyze([str(folder), "--output-dir", str(tmp_path / "r3")]) == 2
    assert "rows have sigma=0.25 but its manifest says sigma=0.5" in capsys.readouterr().err
    (folder / "run.json").write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION}))
    assert analyze([str(folder), "--output-dir", str(tmp_path / "r4")]) == 0  # control: consistent
