"""``adre-ray analyze`` on published certification logs (the original code's TSV) beside a Parquet run.

Every expected number below is computed by hand from the rows written in this file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from adre_ray.analysis.published_logs import parse_seconds, read_certify_log
from adre_ray.analysis.report import main
from adre_ray.analysis.results import write_part

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"

# Log 1, time in seconds (sigma 0.25). Correctly certified radii 0.512, 1.23, 0.25 of N = 5:
#   CA(0) = CA(0.25) = 3/5 = 60 %, CA(0.5) = 40 %, CA(0.75) = CA(1.0) = 20 %, CA(1.25) = 0;
#   ACR = (0.512 + 1.23 + 0.25) / 5 = 0.3984; one abstention of 5 = 20 %.
LOG_SECONDS = [
    "0\t3\t3\t0.512\t1\t15.4",
    "20\t8\t8\t1.23\t1\t15.2",
    "40\t8\t-1\t0.0\t0\t15.3",
    "60\t0\t6\t0.8\t0\t15.1",   # certified, but the wrong class: never counts
    "80\t6\t6\t0.25\t1\t14.9",
]
# Log 2, time as str(datetime.timedelta). Correct radii 0.1, 0.9, 0.6 of N = 4:
#   CA(0) = 75 %, CA(0.25) = CA(0.5) = 50 %, CA(0.75) = 25 %, CA(1.0) = 0; ACR = 1.6 / 4 = 0.4.
LOG_TIMEDELTA = [
    "0\t3\t3\t0.1\t1\t0:02:35.760262",
    "100\t4\t4\t0.9\t1\t0:02:31.5",
    "200\t7\t-1\t0.0\t0\t1 day, 0:00:01.500000",
    "300\t2\t2\t0.6\t1\t0:02:40.000001",
]
RADII = ["0", "0.25", "0.5", "0.75", "1.0", "1.25"]


def _parquet_row(idx: int, label: int, cls: int, radius: float, t_radius: float) -> dict:
    counts = [1] * 10
    counts[max(cls, 0)] = 991
    return {
        "idx": idx, "label": label, "predict": cls, "correct": cls == label, "correct_tcertify": cls == label,
        "certify_predict": cls, "tcertify_predict": cls, "radius_certify": radius,
        "radius_tcertify": t_radius, "tcertify_mode": "paper", "pA_lower": 0.9, "pB_upper": 0.05,
        "alpha_prime": 0.001, "pA_lower_certify": 0.9, "counts": counts, "pilot_counts": counts,
        "n0": 1000, "n": 1000, "alpha": 0.001, "sigma": 0.25, "seed": 0, "time_s": 0.1,
        "checkpoint": "ckpt.pt", "train_run_id": "",
    }


@pytest.fixture()
def inputs(tmp_path) -> tuple[Path, Path, Path]:
    log_seconds, log_timedelta = tmp_path / "cohen_noise_0.25.tsv", tmp_path / "smoothadv_0.25"
    log_seconds.write_text("\n".join([HEADER, *LOG_SECONDS]) + "\n")
    log_timedelta.write_text("\n".join([HEADER, *LOG_TIMEDELTA]) + "\n")
    # Parquet run: CERTIFY radii 0.3 and 0.6 correct, T-CERTIFY 0.4 and 0.8, of N = 2:
    #   CERTIFY CA(0.5) = 50 %, CA(0.75) = 0; T-CERTIFY CA(0.5) = CA(0.75) = 50 %, CA(1.0) = 0.
    parquet = tmp_path / "ours"
    write_part(parquet, [_parquet_row(0, 3, 3, 0.3, 0.4), _parquet_row(20, 8, 8, 0.6, 0.8)])
    return log_seconds, log_timedelta, parquet


def test_time_styles():
    assert parse_seconds("15.4") == 15.4
    assert parse_seconds("0:02:35.760262") == pytest.approx(155.760262)
    assert parse_seconds("1 day, 0:00:01.500000") == pytest.approx(86401.5)
    assert parse_seconds("2 days, 10:00:00") == pytest.approx(2 * 86400 + 36000)
    with pytest.raises(ValueError, match=r"time='soon'"):
        parse_seconds("soon")


def test_log_rows_are_certify_rows(inputs):
    table = read_certify_log(inputs[1], sigma=0.25)
    rows = table.to_pylist()
    assert [r["idx"] for r in rows] == [0, 100, 200, 300]
    assert [r["certify_predict"] for r in rows] == [3, 4, -1, 2]
    assert [r["radius_certify"] for r in rows] == [0.1, 0.9, 0.0, 0.6]
    assert [r["correct"] for r in rows] == [True, True, False, True]
    assert [r["time_s"] for r in rows] == pytest.approx([155.760262, 151.5, 86401.5, 160.000001])
    assert all(r["radius_tcertify"] is None and r["predict"] is None and r["sigma"] == 0.25 for r in rows)


def test_analyze_logs_beside_a_parquet_run(inputs, tmp_path, capsys):
    log_seconds, log_timedelta, parquet = inputs
    out = tmp_path / "analysis"
    code = main([str(log_seconds), str(log_timedelta), str(parquet), "--label", "Cohen",
                 "--label", "SmoothAdv", "--label", "ours", "--sigma", "0.25", "--radii", *RADII,
                 "--output-dir", str(out), "--no-log-mlflow", "--plot-method", "both"])
    assert code == 0, capsys.readouterr().err
    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run"], r["method"]) for r in rows] == [
        ("Cohen", "CERTIFY"), ("SmoothAdv", "CERTIFY"), ("ours", "CERTIFY"), ("ours", "T-CERTIFY")]
    numbers = [[float(r[f"{float(x):.2f}"]) for x in RADII] for r in rows]
    assert numbers[0] == [60.0, 60.0, 40.0, 20.0, 20.0, 0.0]
    assert numbers[1] == [75.0, 50.0, 50.0, 25.0, 0.0, 0.0]
    assert numbers[2] == [100.0, 100.0, 50.0, 0.0, 0.0, 0.0]
    assert numbers[3] == [100.0, 100.0, 50.0, 50.0, 0.0, 0.0]
    assert [float(r["ACR"]) for r in rows[:2]] == [0.398, 0.4]
    assert [r["sigma"] for r in rows] == ["0.25"] * 4
    assert [float(r["abstain %"]) for r in rows[:2]] == [20.0, 25.0]

    summary = json.loads((out / "summary.json").read_text())
    cohen = summary["Cohen"]["metrics"]
    assert summary["Cohen"]["kind"] == "certify_log" and summary["ours"]["kind"] == "parquet"
    assert cohen["certify/cert_acc@0.50"] == pytest.approx(0.4)
    assert cohen["certify/cert_acc@1.25"] == 0.0
    assert cohen["certify/acr"] == pytest.approx(1.992 / 5)
    assert cohen["certify/num_images"] == 5
    assert not any(k.startswith("tcertify/") or k.startswith("predict/") for k in cohen)
    assert summary["SmoothAdv"]["metrics"]["certify/cert_acc@0.75"] == pytest.approx(0.25)
    assert summary["ours"]["metrics"]["tcertify/cert_acc@0.75"] == pytest.approx(0.5)

    png = (out / "certified_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert sorted(p.name for p in out.glob("certify_vs_tcertify_*.png")) == ["certify_vs_tcertify_ours.png"]


def test_bad_logs_and_sigma_are_refused(inputs, tmp_path, capsys):
    log_seconds, _, parquet = inputs
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join([HEADER, "0\t1\t1\t0.5\t1\t15.0", "5\t1\t1\t0.5\t2\t15.0"]) + "\n")
    assert main([str(bad), "--output-dir", str(tmp_path / "o1"), "--no-log-mlflow"]) == 2
    assert "line 3: correct='2' must be 0 or 1" in capsys.readouterr().err
    bad.write_text("\n".join([HEADER, "0\t1\t1\t0.5\t1\tlater"]) + "\n")
    assert main([str(bad), "--output-dir", str(tmp_path / "o2"), "--no-log-mlflow"]) == 2
    assert "line 2: time='later'" in capsys.readouterr().err
    assert main([str(log_seconds), str(parquet), "--sigma", "0.5", "--output-dir", str(tmp_path / "o3"),
                 "--no-log-mlflow"]) == 2
    assert "certified at sigma=0.25" in capsys.readouterr().err
