"""Checkpoints, result folders and analyze inputs on object storage: a real S3-compatible server (moto's
server mode on 127.0.0.1, a free port) stands in for the bucket; ``file://`` URIs too (issue 17)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from adre_ray import storage
from adre_ray.analysis.results import completed_indices, ensure_manifest, part_files, read_results, write_part
from adre_ray.models import build_model
from adre_ray.models.checkpoint import read_checkpoint, save_model_checkpoint

pytest.importorskip("moto.server")
REPO = Path(__file__).resolve().parents[1]
BUCKET = "adre-test"  # made by the s3_endpoint fixture (conftest)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10")
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model, model_name="small_cnn",
                                 num_classes=10, dataset="cifar10", extra={"sigma": 0.25})


def _upload(local: Path, uri: str) -> None:
    storage.write_bytes_atomic(uri, local.read_bytes())


def _row(idx: int) -> dict:
    return {"idx": idx, "label": 1, "predict": 1, "correct": True, "correct_tcertify": True,
            "certify_predict": 1, "tcertify_predict": 1, "radius_certify": 0.3, "radius_tcertify": 0.35,
            "tcertify_mode": "pilot", "pA_lower": 0.9, "pB_upper": 0.05, "alpha_prime": 0.0005,
            "pA_lower_certify": 0.88, "counts": [0, 90, 10] + [0] * 7, "pilot_counts": [0, 10] + [0] * 8,
            "n0": 10, "n": 100, "alpha": 0.001, "sigma": 0.25, "seed": 0, "time_s": 0.1,
            "checkpoint": "c", "train_run_id": None}


SETTINGS = {"checkpoint": "c", "dataset": "cifar10", "split": "test", "sigma": 0.25, "n0": 10, "n": 100,
            "alpha": 0.001, "seed": 0, "mode": "pilot", "grid": [1.0], "shard_size": 100}


@pytest.mark.parametrize("scheme", ["s3", "file"])
def test_result_folder_on_a_uri(s3_endpoint, tmp_path, scheme):
    out = f"s3://{BUCKET}/results/{tmp_path.name}" if scheme == "s3" else (tmp_path / "out").as_uri()
    assert ensure_manifest(out, SETTINGS) is False
    first = write_part(out, [_row(0), _row(5)])
    write_part(out, [_row(10)])
    assert str(first).startswith(out + "/part-000000000-") and len(part_files(out)) == 2
    assert completed_indices(out) == {0, 5, 10}
    assert read_results(out).column("idx").to_pylist() == [0, 5, 10]
    assert ensure_manifest(out, SETTINGS) is True  # same settings: a resume
    with pytest.raises(ValueError, match=r"sigma=0\.5 differs"):
        ensure_manifest(out, {**SETTINGS, "sigma": 0.5})
    names = storage.list_files(out)
    assert not [n for n in names if n.endswith(".tmp")]  # nothing half-written left behind


def test_checkpoint_file_and_folder_on_s3(s3_endpoint, model_file):
    _upload(model_file, f"s3://{BUCKET}/runs/a/checkpoint_epoch_000001/model.pt")
    local = read_checkpoint(model_file)
    for uri in (f"s3://{BUCKET}/runs/a/checkpoint_epoch_000001/model.pt",
                f"s3://{BUCKET}/runs/a/checkpoint_epoch_000001"):
        remote = read_checkpoint(uri)
        assert remote["model_name"] == local["model_name"] and remote["extra"] == local["extra"]
        assert all(torch.equal(remote["state_dict"][k], v) for k, v in local["state_dict"].items())
    with pytest.raises(ValueError, match=r"checkpoint='s3://adre-test/runs/missing': no such file"):
        read_checkpoint(f"s3://{BUCKET}/runs/missing")


def _readme_certify_argv() -> list[str]:
    """The certify line of README's cluster section, as written (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## On a cluster"):]
    start = section.index("```bash") + len("```bash")
    block = section[start:section.index("```", start)]
    command = re.sub(r"\\\n\s*", " ", block)
    line = next(ln for ln in command.splitlines() if "jobs/certify.py" in ln)
    argv = shlex.split(line)
    return argv[argv.index("jobs/certify.py") + 1:]


@pytest.mark.slow
def test_readme_cluster_certify_line_on_s3_certifies_and_resumes(s3_endpoint, ray_cluster, cifar10_dir,
                                                                  model_file, monkeypatch, tmp_path, capsys):
    """README's `jobs/certify.py` line with the local server as BUCKET: checkpoint and output on S3; a
    second, larger run resumes (certifies only the new images); `analyze` reads the S3 folder."""
    from adre_ray import cli
    from adre_ray.distributed import certify as certify_job

    monkeypatch.chdir(REPO)  # the README's relative paths (jobs/configs/...) as in a job's working dir
    argv = [a.replace("BUCKET", BUCKET) for a in _readme_certify_argv()]
    checkpoint = argv[argv.index("--checkpoint") + 1]
    output = argv[argv.index("--output-dir") + 1]
    assert checkpoint.startswith(f"s3://{BUCKET}/") and output.startswith(f"s3://{BUCKET}/")
    _upload(model_file, f"{checkpoint}/model.pt")
    small = ["--data-dir", str(cifar10_dir), "--actors", "1", "--no-use-gpu", "--n0", "16", "--n", "64",
             "--shard-size", "64", "--batch-size", "64", "--skip", "1000", "--tracking-uri", "none",
             "--no-progress"]
    seen: list = []
    real = certify_job.run_certification

    def recorded(cfg, **kwargs):
        seen.append(real(cfg, **kwargs))
        return seen[-1]

    monkeypatch.setattr(certify_job, "run_certification", recorded)
    assert certify_job.main([*argv, *small, "--max-images", "2"]) == 0
    assert seen[-1].images_certified == 2 and completed_indices(output) == {0, 1000}
    assert certify_job.main([*argv, *small, "--max-images", "3"]) == 0
    assert seen[-1].images_certified == 1 and completed_indices(output) == {0, 1000, 2000}
    rows = read_results(output)
    assert rows.column("checkpoint").to_pylist() == [checkpoint] * 3
    assert all(name.endswith(".parquet") or name == "_run.json" for name in storage.list_files(output))
    capsys.readouterr()
    assert cli.main(["analyze", output, "--output-dir", str(tmp_path / "analysis"), "--no-log-mlflow"]) == 0
    assert (tmp_path / "analysis" / "table.md").is_file()
