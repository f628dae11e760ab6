"""Parquet result I/O: schema round trip, old-version files, atomic parts, corrupt parts, the manifest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adre_ray.analysis.results import (
    MANIFEST_NAME,
    RESULT_SCHEMA,
    SCHEMA_VERSION,
    completed_indices,
    ensure_manifest,
    part_files,
    read_results,
    write_part,
)


def make_row(idx: int, **changes) -> dict:
    counts = [idx % 7, 90, 10 - idx % 7]
    row = {
        "idx": idx, "label": idx % 3, "predict": 1, "correct": idx % 3 == 1,
        "correct_tcertify": idx % 3 == 1, "certify_predict": 1, "tcertify_predict": 1,
        "radius_certify": 0.1 * idx, "radius_tcertify": 0.1 * idx + 0.01,
        "tcertify_mode": "pilot", "pA_lower": 0.8, "pB_upper": 0.15, "alpha_prime": 0.0005,
        "pA_lower_certify": 0.79, "counts": counts, "pilot_counts": [1, 8, 1], "n0": 10, "n": sum(counts),
        "alpha": 0.001, "sigma": 0.25, "seed": 3, "time_s": 1.5, "checkpoint": "/ckpt/model.pt",
        "train_run_id": None, "train_sigma": 0.25, "pb_bound": "max", "samples_used": 10 + sum(counts),
        "shortcut": "none", "noise_scheme": 2, "precision": "fp32", "certify_level": 0.001,
        "target_radius": None, "decision": None,
    }
    row.update(changes)
    return row


SETTINGS = {"checkpoint": "/ckpt/model.pt", "dataset": "cifar10", "split": "test", "sigma": 0.25,
            "n0": 100, "n": 100_000, "alpha": 0.001, "seed": 0, "mode": "pilot", "grid": (0.5, 1.0),
            "shard_size": 10_000, "noise_scheme": 2}


def test_schema_round_trip(tmp_path):
    rows = [make_row(i) for i in (7, 3, 5)]
    path = write_part(tmp_path, rows)
    assert path.parent == tmp_path and path.name.startswith("part-000000003-") and path.suffix == ".parquet"
    table = read_results(tmp_path)
    assert table.schema.names == RESULT_SCHEMA.names
    assert table.schema.equals(RESULT_SCHEMA)
    got = table.to_pylist()
    assert [r["idx"] for r in got] == [3, 5, 7]  # sorted by idx
    for row in got:
        expected = {**make_row(row["idx"]), "schema_version": SCHEMA_VERSION}
        assert row == expected
    # a single file reads the same as its folder
    assert read_results(path).equals(table)


def test_train_sigma_is_optional_and_null_when_unknown(tmp_path):
    row = make_row(1)
    del row["train_sigma"]  # a writer that does not know it (e.g. a model_fn run)
    write_part(tmp_path, [row])
    assert read_results(tmp_path).to_pylist()[0]["train_sigma"] is None


def test_rows_must_name_every_column(tmp_path):
    row = make_row(1)
    del row["radius_tcertify"]
    with pytest.raises(ValueError, match="radius_tcertify"):
        write_part(tmp_path, [row])
    with pytest.raises(ValueError, match="bogus"):
        write_part(tmp_path, [make_row(1, bogus=1)])
    with pytest.raises(ValueError, match="at least one row"):
        write_part(tmp_path, [])
    assert list(tmp_path.iterdir()) == []


def test_old_version_file_is_readable(tmp_path):
    """A version-1 file (ARCHITECTURE.md's column list, int32 idx, an extra column) beside a new one."""
    old = pa.table({
        "idx": pa.array([2, 0], pa.int32()), "label": pa.array([1, 4], pa.int16()),
        "predict": [1, -1], "radius_certify": [0.3, 0.0], "radius_tcertify": [0.35, 0.0],
        "tcertify_mode": ["paper", "paper"], "pA_lower": [0.9, 0.4], "pB_upper": [0.05, 0.6],
        "alpha_prime": [0.0009, 0.001], "counts": [[1, 95, 4], [30, 30, 40]], "n0": [100, 100],
        "alpha": [0.001, 0.001], "sigma": [0.5, 0.5], "seed": [0, 0], "time_s": [2.0, 2.1],
        "certify_predict": [1, -1], "tcertify_predict": [1, -1], "checkpoint": ["a", "a"],
        "note": ["old", "old"],
    })
    pq.write_table(old, tmp_path / "part-000000000-old.parquet")
    write_part(tmp_path, [make_row(1)])
    table = read_results(tmp_path)
    assert table.schema.names[: len(RESULT_SCHEMA)] == RESULT_SCHEMA.names
    assert table.schema.names[len(RESULT_SCHEMA):] == ["note"]  # extra column kept
    rows = {r["idx"]: r for r in table.to_pylist()}
    assert sorted(rows) == [0, 1, 2]
    # derived from the stored columns: n = sum(counts), correct = certify_predict == label
    assert rows[2]["n"] == 100 and rows[0]["n"] == 100
    assert rows[2]["correct"] is True and rows[0]["correct"] is False
    assert rows[2]["correct_tcertify"] is True and rows[0]["correct_tcertify"] is False
    # not derivable -> null; the writer's version is recorded per row
    assert rows[2]["pilot_counts"] is None and rows[2]["train_run_id"] is None
    assert rows[2]["schema_version"] == 1 and rows[1]["schema_version"] == SCHEMA_VERSION
    assert rows[2]["noise_scheme"] == 1 and rows[1]["noise_scheme"] == 2  # before v3: noise scheme 1
    assert rows[2]["note"] == "old" and rows[1]["note"] is None
    assert rows[2]["label"] == 1 and table.schema.field("label").type == pa.int64()


def test_atomic_write_leaves_no_tmp_files(tmp_path, monkeypatch):
    for start in (0, 10, 20):
        write_part(tmp_path, [make_row(start + k) for k in range(3)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and all(n.startswith("part-") and n.endswith(".parquet") for n in names)
    assert completed_indices(tmp_path) == {0, 1, 2, 10, 11, 12, 20, 21, 22}

    # a writer that dies mid-write leaves neither a part nor a temporary file
    def broken_write(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_part(tmp_path, [make_row(30)])
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    # and a stray temporary file of a killed process is ignored by readers
    (tmp_path / ".part-000000040-x.parquet.tmp").write_bytes(b"partial")
    assert completed_indices(tmp_path) == {0, 1, 2, 10, 11, 12, 20, 21, 22}
    assert read_results(tmp_path).num_rows == 9


def test_corrupt_part_is_reported_by_name(tmp_path):
    write_part(tmp_path, [make_row(1)])
    good = write_part(tmp_path, [make_row(2)])
    bad = tmp_path / "part-000000003-deadbeef.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated copy
    with pytest.raises(ValueError, match=bad.name):
        read_results(tmp_path)
    with pytest.raises(ValueError, match=bad.name):
        completed_indices(tmp_path)
    with pytest.warns(RuntimeWarning, match=bad.name):
        table = read_results(tmp_path, strict=False)
    assert table.column("idx").to_pylist() == [1, 2]


def test_duplicate_idx_is_an_error(tmp_path):
    first = write_part(tmp_path, [make_row(4)])
    second = write_part(tmp_path, [make_row(4, radius_certify=9.0)])
    with pytest.raises(ValueError, match="idx=4") as info:
        read_results(tmp_path)
    assert first.name in str(info.value) and second.name in str(info.value)
    with pytest.warns(RuntimeWarning, match="idx=4"):
        assert read_results(tmp_path, strict=False).num_rows == 1


def test_manifest_resume_and_mismatch(tmp_path):
    assert ensure_manifest(tmp_path, SETTINGS) is False  # new run
    stored = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert stored["grid"] == [0.5, 1.0] and stored["schema_version"] == SCHEMA_VERSION
    assert ensure_manifest(tmp_path, dict(SETTINGS)) is True  # same settings: resume
    assert ensure_manifest(tmp_path, {**SETTINGS, "grid": [0.5, 1.0], "data_dir": "elsewhere"}) is True
    for field, value in (("sigma", 0.5), ("n", 10_000), ("mode", "paper"), ("grid", (0.1, 1.0)),
                         ("checkpoint", "/other.pt"), ("seed", 1), ("shard_size", 5_000)):
        with pytest.raises(ValueError, match=rf"{field}=.*differs"):
            ensure_manifest(tmp_path, {**SETTINGS, field: value})


def test_manifest_without_noise_scheme_is_scheme_1(tmp_path):
    """A folder written before noise_scheme existed holds scheme-1 noise: resuming it with another
    scheme is refused, naming the field (its counts would come from a different noise stream)."""
    older = {key: value for key, value in SETTINGS.items() if key != "noise_scheme"}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(older))
    assert ensure_manifest(tmp_path, {**SETTINGS, "noise_scheme": 1}) is True
    with pytest.raises(ValueError, match=r"noise_scheme=2 differs .*noise_scheme=1"):
        ensure_manifest(tmp_path, SETTINGS)


def test_parts_without_manifest_are_refused(tmp_path):
    write_part(tmp_path, [make_row(1)])
    with pytest.raises(ValueError, match="no _run.json"):
        ensure_manifest(tmp_path, SETTINGS)
    assert part_files(tmp_path) and not (tmp_path / MANIFEST_NAME).exists()


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_results(tmp_path / "nope")
    assert read_results(tmp_path).num_rows == 0  # an empty folder is an empty result
