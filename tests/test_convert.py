"""``adre-ray convert``: ImageFolder tree -> Parquet shards the datasets read; bad input refused by name."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic_imagenet import IMAGENET_CLASSES, class_name, make_image_folder

from adre_ray.data import build_dataset
from adre_ray.data.convert import CLASS_NAMES_KEY, class_names_of, plan_conversion
from adre_ray.distributed.convert import main as convert_main

ROWS_PER_FILE = 700
ROWS_PER_GROUP = 100


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory) -> Path:
    """1,000 classes: 2 train images and 1 val image per class (3,000 tiny JPEGs)."""
    return make_image_folder(tmp_path_factory.mktemp("imagenet_src"), {"train": 2, "val": 1})


@pytest.fixture(scope="module")
def converted(ray_cluster, imagenet_tree, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("imagenet_parquet")
    code = convert_main([str(imagenet_tree), "--output-dir", str(dst), "--rows-per-file", str(ROWS_PER_FILE),
                         "--rows-per-group", str(ROWS_PER_GROUP)])
    assert code == 0
    return dst


def test_round_trip_counts_labels_class_names(converted, imagenet_tree):
    names = tuple(class_name(i) for i in range(IMAGENET_CLASSES))
    for split, per_class in (("train", 2), ("val", 1)):
        files = sorted((converted / split).glob("*.parquet"))
        total = IMAGENET_CLASSES * per_class
        assert len(files) == -(-total // ROWS_PER_FILE)
        table = pq.read_table(files)
        assert table.num_rows == total
        counts = Counter(table.column("label").to_pylist())
        assert counts == {label: per_class for label in range(IMAGENET_CLASSES)}
        for path in files:
            assert class_names_of(path) == names
            meta = pq.ParquetFile(path).metadata
            assert all(meta.row_group(g).num_rows <= ROWS_PER_GROUP for g in range(meta.num_row_groups))
        # every row: its label is its class folder's index, its bytes are the file's bytes as stored
        for image, label, source in zip(table.column("image").to_pylist()[:50],
                                        table.column("label").to_pylist()[:50],
                                        table.column("source_path").to_pylist()[:50], strict=True):
            assert source.split("/")[0] == names[label]
            assert image == (imagenet_tree / split / source).read_bytes()
        # rows are shuffled across shards: the first file already holds many classes
        assert len(set(pq.read_table(files[0]).column("label").to_pylist())) > 100


def test_datasets_read_the_result(converted):
    train = build_dataset("imagenet", converted, "train", augment=True)
    test = build_dataset("imagenet", converted, "test", augment=False)
    assert (len(train), len(test)) == (2 * IMAGENET_CLASSES, IMAGENET_CLASSES)
    image, label = test[0]
    assert image.shape == (3, 224, 224) and 0 <= label < IMAGENET_CLASSES
    assert np.bincount(train.targets, minlength=IMAGENET_CLASSES).tolist() == [2] * IMAGENET_CLASSES


def test_rerun_skips_complete_shards_and_rewrites_missing(converted, imagenet_tree, capsys):
    victim = sorted((converted / "val").glob("*.parquet"))[0]
    victim.unlink()
    args = [str(imagenet_tree), "--output-dir", str(converted), "--rows-per-file", str(ROWS_PER_FILE),
            "--rows-per-group", str(ROWS_PER_GROUP)]
    assert convert_main(args) == 0
    out = capsys.readouterr().out
    assert "train: 2000 rows in 3 files" in out and "(0 written, 3 already there" in out
    assert "val: 1000 rows in 2 files" in out and "(1 written, 1 already there" in out
    assert victim.is_file()


def test_other_settings_refuse_to_mix_shards(converted, imagenet_tree, capsys):
    before = sorted(p.name for p in (converted / "train").iterdir())
    code = convert_main([str(imagenet_tree), "--output-dir", str(converted), "--rows-per-file", "999"])
    assert code == 2
    assert "not part of this conversion" in capsys.readouterr().err
    assert sorted(p.name for p in (converted / "train").iterdir()) == before


def test_unreadable_image_fails_its_shard_only(ray_cluster, tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", {"train": 2}, classes=3)
    bad = src / "train" / class_name(1) / "train_1_0.JPEG"
    bad.write_bytes(b"not a jpeg")
    dst = tmp_path / "dst"
    assert convert_main([str(src), "--output-dir", str(dst), "--rows-per-file", "2"]) == 2
    assert "train_1_0.JPEG" in capsys.readouterr().err
    written = sorted((dst / "train").iterdir())
    assert len(written) == 2 and all(p.suffix == ".parquet" for p in written)  # no temp file left
    bad.write_bytes((src / "train" / class_name(1) / "train_1_1.JPEG").read_bytes())
    assert convert_main([str(src), "--output-dir", str(dst), "--rows-per-file", "2"]) == 0
    assert "(1 written, 2 already there" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["empty_root", "empty_class", "non_image", "mismatched", "missing"])
def test_bad_input_refused_by_name_nothing_written(tmp_path, capsys, case):
    src = tmp_path / "src"
    named = str(src)
    if case == "empty_root":
        src.mkdir()
    elif case == "empty_class":
        make_image_folder(src, {"train": 1}, classes=3)
        for p in (src / "train" / class_name(2)).iterdir():
            p.unlink()
        named = str(src / "train" / class_name(2))
    elif case == "non_image":
        make_image_folder(src, {"train": 1, "val": 1}, classes=3)
        (src / "val" / class_name(0) / "notes.txt").write_text("hello")
        named = str(src / "val" / class_name(0) / "notes.txt")
    elif case == "mismatched":
        make_image_folder(src, {"train": 1, "val": 1}, classes=3)
        shutil.rmtree(src / "val" / class_name(1))
        named = str(src / "val")
    dst = tmp_path / "dst"
    assert convert_main([str(src), "--output-dir", str(dst)]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not dst.exists()


def test_single_split_folder_and_class_metadata(tmp_path):
    src = make_image_folder(tmp_path, {"train": 1}, classes=4) / "train"
    (plan,) = plan_conversion(src, rows_per_file=3)
    assert plan.name == "train" and plan.class_names == tuple(class_name(i) for i in range(4))
    assert [len(s.rows) for s in plan.shards] == [3, 1]
    assert json.loads(json.dumps(list(plan.class_names))) == list(plan.class_names)
    assert CLASS_NAMES_KEY == b"adre_ray.class_names"
