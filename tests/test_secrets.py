"""No object-storage secret on disk after a training, a certification and a search to ``s3://``.

Before: the driver passed its ``AWS_*`` variables, keys included, to the actors and Ray Train workers in a
``runtime_env``, and Ray wrote them in plain text to ``<session>/logs/runtime_env_agent.log`` (mode 644).
Now only settings (endpoint, region, credential-file paths) are passed; the keys come from each node's own
credential chain (here: the node's credentials file, ``node_credentials_file`` in conftest).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import S3_BUCKET, fresh_mlflow_db, write_node_credentials

from adre_ray import storage
from adre_ray.analysis.results import completed_indices, read_results
from adre_ray.models.checkpoint import read_checkpoint

pytest.importorskip("moto.server")
REPO = Path(__file__).resolve().parents[1]


def _files_holding(needles: list[bytes], roots: list[Path]) -> list[str]:
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            try:
                data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            except OSError:  # a socket, a file removed meanwhile
                continue
            found += [f"{path}: {needle.decode()[:6]}..." for needle in needles if needle in data]
    return found


def _objects_holding(needles: list[bytes], uri: str) -> tuple[int, list[str]]:
    fs, inner = storage.resolve(uri)
    listed = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    infos = [info for info in listed if info.type == pafs.FileType.File]
    found = []
    for info in infos:
        with fs.open_input_stream(info.path) as stream:
            data = stream.read()
        found += [f"s3://{info.path}" for needle in needles if needle in data]
    return len(infos), found


@pytest.mark.slow
def test_a_planted_secret_is_nowhere_after_train_certify_and_tune_to_s3(
        s3_endpoint, ray_cluster, node_credentials_file, cifar10_dir, tmp_path, monkeypatch, capsys):
    from adre_ray import cli

    keys = {"AWS_ACCESS_KEY_ID": f"AKIDPLANTED{secrets.token_hex(6).upper()}",
            "AWS_SECRET_ACCESS_KEY": f"planted-secret-{secrets.token_hex(12)}",
            "AWS_SESSION_TOKEN": f"planted-token-{secrets.token_hex(12)}"}
    for name, value in keys.items():  # the driver's environment, and the node's credential file
        monkeypatch.setenv(name, value)
    write_node_credentials(node_credentials_file, keys)
    tracking = fresh_mlflow_db(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.chdir(tmp_path)
    bucket = f"s3://{S3_BUCKET}/secrets-{tmp_path.name}"
    small = ["--set", f"data.data_dir={cifar10_dir}", "--set", "data.train_subset=32", "--set",
             "data.test_subset=16", "--set", "scaling.num_workers=1", "--set", "schedule.epochs=1",
             "--set", "schedule.warmup_epochs=0", "--set", "batch_size=16", "--set", "loss.k=1",
             "--set", f"run.storage_path={bucket}/runs", "--set", f"run.tracking_uri={tracking}"]
    config = str(REPO / "jobs" / "configs" / "train_cifar10_small_cpu.yaml")

    assert cli.main(["train", "--config", config, *small, "--set", "run.name=secret-train"]) == 0
    checkpoint = next(line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()
                      if line.startswith("checkpoint: "))
    assert checkpoint.startswith(f"{bucket}/runs/secret-train/checkpoint_")  # Ray Train wrote it to S3
    assert read_checkpoint(checkpoint)["model_name"] == "small_cnn"
    assert cli.main(["certify", "--checkpoint", checkpoint, "--output-dir", f"{bucket}/certify",
                     "--data-dir", str(cifar10_dir), "--n0", "8", "--n", "32", "--shard-size", "32",
                     "--batch-size", "32", "--max-images", "2", "--actors", "1", "--no-progress",
                     "--tracking-uri", tracking]) == 0
    assert completed_indices(f"{bucket}/certify") == {0, 20}  # certified from the checkpoint's URI
    assert read_results(f"{bucket}/certify").column("checkpoint").to_pylist() == [checkpoint] * 2
    space = yaml.safe_load((REPO / "tune_spaces" / "tiny_cpu.yaml").read_text())
    space["search"] = {"loss.lam": {"grid": [0.1]}}  # one trial
    space["validation"].update(size=8, n=16)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert cli.main(["tune", "--space", str(tmp_path / "space.yaml"), "--config", config, *small,
                     "--output-dir", str(tmp_path / "tune")]) == 0

    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    needles = [keys["AWS_SECRET_ACCESS_KEY"].encode(), keys["AWS_SESSION_TOKEN"].encode()]
    roots = [session, tmp_path / "mlflow.db", tmp_path / "mlartifacts", tmp_path / "tune"]
    assert (session / "logs").is_dir() and (tmp_path / "mlflow.db").is_file()
    assert _files_holding(needles, roots) == []
    written, holding = _objects_holding(needles, bucket)  # checkpoints, run.json, Parquet parts, Tune state
    assert written > 5 and holding == []
    assert any(name.endswith(".parquet") for name in storage.list_files(f"{bucket}/certify"))
