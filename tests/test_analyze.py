"""Tables, plots and ``adre-ray analyze`` end to end on synthetic certification results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pytest

from adre_ray.analysis.metrics import ABSTAIN
from adre_ray.analysis.plots import plot_certified_accuracy, plot_certify_vs_tcertify
from adre_ray.analysis.report import main
from adre_ray.analysis.results import read_results, write_part
from adre_ray.analysis.tables import certified_accuracy_table, radius_column, to_csv, to_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def _row(idx: int, label: int, cls: int, radius: float, t_cls: int, t_radius: float,
         sigma: float = 0.25) -> dict:
    counts = [1] * 10
    counts[max(cls, 0)] = 991
    return {
        "idx": idx, "label": label, "predict": cls, "correct": cls == label,
        "correct_tcertify": t_cls == label, "certify_predict": cls, "tcertify_predict": t_cls,
        "radius_certify": radius, "radius_tcertify": t_radius, "tcertify_mode": "paper", "pA_lower": 0.9,
        "pB_upper": 0.05, "alpha_prime": 0.001, "pA_lower_certify": 0.9, "counts": counts,
        "pilot_counts": counts, "n0": 1000, "n": 1000, "alpha": 0.001, "sigma": sigma, "seed": 0,
        "time_s": 0.1, "checkpoint": "ckpt.pt", "train_run_id": "",
    }


# Run A (4 images): CERTIFY radii 0.3, 0.6 correct; an abstention; a wrong class at radius 1.0.
#   CA(0) = CA(0.25) = 2/4 = 50.0 %, CA(0.5) = 25.0 %, CA(0.75) = CA(1.0) = 0; ACR = 0.9 / 4 = 0.225.
#   T-CERTIFY radii 0.4, 0.8: CA(0.5) = CA(0.75) = 25.0 %, CA(1.0) = 0; ACR = 1.2 / 4 = 0.3.
ROWS_A = [
    _row(0, 0, 0, 0.3, 0, 0.4),
    _row(1, 1, 1, 0.6, 1, 0.8),
    _row(2, 2, ABSTAIN, 0.0, ABSTAIN, 0.0),
    _row(3, 3, 4, 1.0, 4, 1.2),
]
# Run B (3 images, two parts): CERTIFY 1.0, 0.2 correct, one abstention.
#   CA(0) = 2/3 = 66.7 %, CA(0.25) = ... = CA(1.0) = 1/3 = 33.3 %; ACR = 1.2 / 3 = 0.4; abstain 33.3 %.
ROWS_B = [
    _row(10, 5, 5, 1.0, 5, 1.1, sigma=0.5),
    _row(11, 6, 6, 0.2, 6, 0.2, sigma=0.5),
    _row(12, 7, ABSTAIN, 0.0, ABSTAIN, 0.0, sigma=0.5),
]


@pytest.fixture()
def result_dirs(tmp_path) -> tuple[Path, Path]:
    dir_a, dir_b = tmp_path / "run_a", tmp_path / "run_b"
    write_part(dir_a, ROWS_A)
    write_part(dir_b, ROWS_B[:2])
    write_part(dir_b, ROWS_B[2:])
    return dir_a, dir_b


@pytest.fixture()
def runs(result_dirs) -> dict[str, pa.Table]:
    return {"A": read_results(result_dirs[0]), "B": read_results(result_dirs[1])}


def _numbers(row: dict) -> list[float]:
    return [row[radius_column(r)] for r in RADII]


def test_table_numbers(runs):
    rows = certified_accuracy_table(runs, radii=RADII)
    assert [(r["run"], r["method"]) for r in rows] == [
        ("A", "CERTIFY"), ("A", "T-CERTIFY"), ("B", "CERTIFY"), ("B", "T-CERTIFY")]
    a_cert, a_tcert, b_cert, _ = rows
    assert _numbers(a_cert) == [50.0, 50.0, 25.0, 0.0, 0.0]
    assert a_cert["ACR"] == 0.225 and a_cert["abstain %"] == 25.0 and a_cert["images"] == 4
    assert _numbers(a_tcert) == [50.0, 50.0, 25.0, 25.0, 0.0]
    assert a_tcert["ACR"] == 0.3
    assert _numbers(b_cert) == [66.7, 33.3, 33.3, 33.3, 33.3]
    assert b_cert["ACR"] == 0.4 and b_cert["abstain %"] == 33.3 and b_cert["sigma"] == "0.5"
    only_tcert = certified_accuracy_table(runs, radii=RADII, method="tcertify")
    assert [r["method"] for r in only_tcert] == ["T-CERTIFY", "T-CERTIFY"]
    with pytest.raises(ValueError, match="method='bogus'"):
        certified_accuracy_table(runs, method="bogus")


def test_markdown_and_csv(runs, tmp_path):
    rows = certified_accuracy_table(runs, radii=RADII)
    markdown = to_markdown(rows, tmp_path / "t.md")
    lines = markdown.strip().splitlines()
    assert (tmp_path / "t.md").read_text() == markdown
    assert lines[0] == ("| run | method | sigma | n | images | 0.00 | 0.25 | 0.50 | 0.75 | 1.00 | ACR "
                        "| abstain % | samples / image |")
    assert len(lines) == 2 + 4
    # the best value of each column is bold, ties included: B has the best CA at 0 (66.7) and at 0.5-1.0
    # (33.3 > A's 25.0); A's 50.0 wins at 0.25; B T-CERTIFY has the best ACR, 1.3 / 3 = 0.433.
    assert lines[4] == ("| B | CERTIFY | 0.5 | 1000 | 3 | **66.7** | 33.3 | **33.3** | **33.3** | **33.3** "
                        "| 0.400 | 33.3 | 2000 |")
    assert "| **0.433** |" in lines[-1]
    to_csv(rows, tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as handle:
        parsed = list(csv.DictReader(handle))
    assert [float(parsed[0][radius_column(r)]) for r in RADII] == [50.0, 50.0, 25.0, 0.0, 0.0]
    assert float(parsed[2]["ACR"]) == 0.4


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_plots_write_png(runs, tmp_path):
    _assert_png(plot_certified_accuracy(runs, tmp_path / "fig1.png"))
    _assert_png(plot_certified_accuracy(runs, tmp_path / "fig1_both.png", method="both"))
    _assert_png(plot_certify_vs_tcertify(runs["A"], tmp_path / "sub" / "fig2.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_certify_vs_tcertify(runs["A"].slice(0, 0), tmp_path / "x.png")


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_names(client, run_id: str, path: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


EXPECTED_FILES = {"table.md", "table.csv", "certified_accuracy.png", "certify_vs_tcertify_A.png",
                  "certify_vs_tcertify_B.png", "summary.json"}


def test_analyze_cli_with_mlflow(result_dirs, tmp_path, mlflow_uri, capsys):
    """One test for every MLflow path: creating the per-test SQLite store costs ~10 s on 2 cores."""
    from adre_ray.tracking import log_artifact, mlflow_run

    client = _mlflow_client(mlflow_uri)
    # 1. two result folders -> files in output-dir, and one analysis run holding them and the metrics
    out = tmp_path / "analysis"
    rc = main([str(result_dirs[0]), str(result_dirs[1]), "--label", "A", "--label", "B",
               "--output-dir", str(out), "--radii", *map(str, RADII), "--experiment", "analysis-test"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert "| A | CERTIFY | 0.25 | 1000 | 4 | 50.0 | **50.0** | 25.0 | 0.0 | 0.0 | 0.225 | 25.0 |" \
        in captured.out
    for name in ("certified_accuracy.png", "certify_vs_tcertify_A.png", "certify_vs_tcertify_B.png"):
        _assert_png(out / name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["B"]["metrics"]["certify/acr"] == pytest.approx(0.4)
    experiment = client.get_experiment_by_name("analysis-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert _artifact_names(client, run.info.run_id, "analysis") == EXPECTED_FILES
    assert run.data.metrics["A/certify/cert_acc_at_0.50"] == 0.25
    assert run.data.metrics["B/tcertify/acr"] == pytest.approx(1.3 / 3)

    # 2. mlflow:<run_id> input: the run's Parquet artifacts under "results" are downloaded and analysed,
    # and the outputs go into that same run under analysis/
    with mlflow_run("certify-test", "certify") as source:
        log_artifact(result_dirs[0], "results", run_id=source.info.run_id)
    run_id = source.info.run_id
    from_run = tmp_path / "from_run"
    rc = main([f"mlflow:{run_id}", "--output-dir", str(from_run), "--radii", *map(str, RADII)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # labelled by the run's name; bold marks the better of CERTIFY / T-CERTIFY (ties both)
    assert ("| certify | CERTIFY | 0.25 | 1000 | 4 | **50.0** | **50.0** | **25.0** | 0.0 | 0.0 | 0.225 "
            "| 25.0 |") in captured.out
    assert _artifact_names(client, run_id, "analysis") == {
        "table.md", "table.csv", "certified_accuracy.png", "certify_vs_tcertify_certify.png", "summary.json"}
    assert client.get_run(run_id).data.metrics["certify/cert_acc_at_0.50"] == 0.25
    # the runs:/ form reads the same rows
    rc = main([f"runs:/{run_id}/results", "--output-dir", str(tmp_path / "runs_form"), "--no-log-mlflow",
               "--radii", *map(str, RADII)])
    assert rc == 0
    assert (tmp_path / "runs_form" / "table.md").read_text() == (from_run / "table.md").read_text()

    # 3. an unknown run id exits 2 and names it
    capsys.readouterr()
    assert main(["mlflow:0123456789abcdef", "--output-dir", str(tmp_path / "o")]) == 2
    assert "mlflow:0123456789abcdef" in capsys.readouterr().err


def test_analyze_bad_path_exits_2(tmp_path, capsys):
    missing = tmp_path / "does_not_exist"
    out = tmp_path / "out"
    assert main([str(missing), "--output-dir", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()  # nothing written on bad input
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--output-dir", str(out)]) == 2
    assert str(empty) in capsys.readouterr().err


def test_analyze_bad_labels_and_radii_exit_2(result_dirs, tmp_path, capsys):
    two_labels = ["--label", "a", "--label", "b"]
    assert main([str(result_dirs[0]), *two_labels, "--output-dir", str(tmp_path / "o")]) == 2
    assert "--label" in capsys.readouterr().err
    assert main([str(result_dirs[0]), "--output-dir", str(tmp_path / "o"), "--radii", "-1"]) == 2
    assert "radii=[-1.0]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
