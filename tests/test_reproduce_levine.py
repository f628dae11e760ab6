"""A short reproduction of Levine et al. (2020)'s published certification log: the published small MNIST
checkpoint imported with a model_fn, the MNIST test set converted by the documented recipe (4x4 mean
pooling), CERTIFY on Ray at small n for large-margin images only (published top-class count >= 99.5% of
100,000), so every outcome below holds with overwhelming probability (and the seeds are fixed).
Skipped where ../shared/data is absent."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest

from adre_ray.analysis.results import read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.data.mnist import mnist_arrays
from adre_ray.distributed.certify import run_certification
from adre_ray.models.importers import import_checkpoint

SHARED = Path(os.environ.get("ADRE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LEVINE = SHARED / "real" / "levine2020_small_mnist" / "noise_0.25"
MNIST = SHARED / "mnist"
PUBLISHED_N = 100_000
N = 2_000
Z = 6.0  # normal quantile of the check below: a false alarm has probability < 1e-8 per image


def published_rows() -> list[dict[str, str]]:
    with open(LEVINE / "certify_N_100000.tsv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.mark.skipif(not (LEVINE / "checkpoint.pth.tar").is_file() or not MNIST.is_dir(),
                    reason=f"published model or MNIST not found under {SHARED}")
def test_large_margin_images_reproduce_the_published_log(ray_cluster, tmp_path):
    chosen = [row for row in published_rows() if int(row["raw_count"]) >= 99_500][:6]
    x, y = mnist_arrays(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz", pool=4)
    rows = np.array([int(row["idx"]) for row in chosen])
    np.savez(tmp_path / "slice.npz", x=x[rows], y=y[rows])
    ckpt = import_checkpoint(LEVINE / "checkpoint.pth.tar", tmp_path / "imported.pt",
                             source_format="smoothing", dataset=None,
                             model_fn="tests.model_fns:small_mnist_net", sigma=0.25)
    cfg = CertifyConfig(checkpoint=str(ckpt), dataset="arrays", data_dir=str(tmp_path / "slice.npz"),
                        skip=1, n0=100, n=N, alpha=0.001, shard_size=1_000, num_actors=2, seed=0,
                        output_dir=str(tmp_path / "out"), tracking_uri="none", progress=False)
    ours = read_results(run_certification(cfg).output_dir).to_pylist()
    assert len(ours) == len(chosen) == 6
    for mine, theirs in zip(ours, chosen, strict=True):
        assert mine["label"] == int(theirs["label"])
        assert mine["certify_predict"] == int(theirs["predict"]) == mine["label"]
        # the top class's frequency agrees with the published one within binomial error of both runs
        p = int(theirs["raw_count"]) / PUBLISHED_N
        spread = Z * math.sqrt(max(p * (1 - p), 1 / N) * (1 / N + 1 / PUBLISHED_N))
        assert abs(mine["counts"][mine["certify_predict"]] / N - p) <= spread


def test_published_logs_with_extra_columns_are_read(tmp_path):
    from adre_ray.analysis.published_logs import is_certify_log, read_certify_log

    log = tmp_path / "certify_N_100000.tsv"
    log.write_text("idx\tlabel\tpredict\tradius\traw_count\tp_A_bar\tcorrect\ttime\n"
                   "0\t7\t7\t0.409\t95126\t0.94912\t1\t0:00:00.448263\n"
                   "10\t0\t-1\t0.0\t41234\t0.40\t0\t0:00:00.062152\n")
    assert is_certify_log(log)
    rows = read_certify_log(log, sigma=0.25).to_pylist()
    got = [(r["idx"], r["label"], r["certify_predict"], r["radius_certify"], r["correct"]) for r in rows]
    assert got == [(0, 7, 7, 0.409, True), (10, 0, -1, 0.0, False)]
    assert rows[0]["time_s"] == pytest.approx(0.448263)
    shuffled = tmp_path / "other.tsv"  # the columns in another order are read by header name (issue 21)
    shuffled.write_text("label\tidx\tpredict\tradius\tcorrect\ttime\n7\t0\t7\t0.4\t1\t1.0\n")
    assert is_certify_log(shuffled)
    [row] = read_certify_log(shuffled, sigma=0.25).to_pylist()
    assert (row["idx"], row["label"], row["certify_predict"], row["radius_certify"]) == (0, 7, 7, 0.4)
