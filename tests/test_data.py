"""Datasets: CIFAR-10 Parquet (lazy), ImageNet-style Parquet shards and image folders, subsets, errors."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from adre_ray.data import (
    ParquetImageDataset,
    build_dataset,
    dataset_info,
    dataset_labels,
    load_images,
    resolve_source,
    stratified_subset_indices,
)

# torchvision 0.29 deprecates its JPEG decoder (adre_ray.data silences this; pytest re-enables it).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def jpeg_bytes(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> bytes:
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="JPEG")
    return buffer.getvalue()


# Odd sizes, both orientations, and a grayscale JPEG (ImageNet has some): all must come out 3 x 224 x 224.
SHAPES = [(300, 260, "RGB"), (240, 320, "RGB"), (230, 230, "L"), (500, 250, "RGB")]


@pytest.fixture(scope="module")
def imagenet_parquet(tmp_path_factory) -> Path:
    """An ImageNet-style dir of Parquet shards: train/ with 2 shards (2 row groups each), val/ with 1."""
    root = tmp_path_factory.mktemp("imagenet_parquet")
    rng = np.random.default_rng(0)
    for split, shards in (("train", 2), ("val", 1)):
        (root / split).mkdir()
        for shard in range(shards):
            images = [jpeg_bytes(rng, h, w, mode) for h, w, mode in SHAPES]
            labels = pa.array([0, 999, 17, 3 + shard], type=pa.int64())
            table = pa.table({"image": pa.array(images, type=pa.binary()), "label": labels})
            pq.write_table(table, root / split / f"part-{shard:05d}.parquet", row_group_size=2)
    return root


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet_folder")
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for synset in ("n01440764", "n01443537"):
            (root / split / synset).mkdir(parents=True)
            for i, (h, w, mode) in enumerate(SHAPES[:2]):
                (root / split / synset / f"{i}.JPEG").write_bytes(jpeg_bytes(rng, h, w, mode))
    return root


# -- dataset facts -----------------------------------------------------------------------------------

def test_dataset_info():
    cifar, imagenet = dataset_info("cifar10"), dataset_info("imagenet")
    assert (cifar.num_classes, cifar.image_size) == (10, 32)
    assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2470, 0.2435, 0.2616)
    assert (imagenet.num_classes, imagenet.image_size) == (1000, 224)
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match=r"dataset='svhn'.*cifar10, imagenet"):
        dataset_info("svhn")


# -- CIFAR-10 Parquet --------------------------------------------------------------------------------

def test_cifar10_parquet_sizes_and_lazy_reads(cifar10_dir):
    train = build_dataset("cifar10", cifar10_dir, "train")
    test = build_dataset("cifar10", cifar10_dir, "test")
    assert resolve_source("cifar10", cifar10_dir, "train") == "parquet"
    assert isinstance(train, ParquetImageDataset) and (len(train), len(test)) == (50_000, 10_000)
    assert train.cached_row_groups == 0 and test.cached_row_groups == 0  # only labels read so far
    test[0]
    assert test.cached_row_groups == 1
    assert np.bincount(train.targets).tolist() == [5000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10


def test_cifar10_rows_match_the_file(cifar10_dir):
    """Index i is row i of test.parquet (across row-group boundaries), decoded to [0, 1] float pixels."""
    test = build_dataset("cifar10", cifar10_dir, "test")
    table = pq.read_table(cifar10_dir / "test.parquet", columns=["image", "label"])
    for i in (0, 4999, 5000, 5001, 9999, -1):
        row = i % len(test)
        image, label = test[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert isinstance(label, int) and label == table.column("label")[row].as_py()
        with Image.open(io.BytesIO(table.column("image")[row].as_py())) as pil:
            expected = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1) / 255
        torch.testing.assert_close(image, expected, rtol=0, atol=1 / 255)  # decoder rounding at most 1 level
    with pytest.raises(IndexError, match="index=10000"):
        test[10_000]


def test_eval_is_deterministic_and_train_augments(cifar10_dir):
    test = build_dataset("cifar10", cifar10_dir, "test")
    assert torch.equal(test[123][0], test[123][0])
    train = build_dataset("cifar10", cifar10_dir, "train")
    plain = build_dataset("cifar10", cifar10_dir, "train", augment=False)
    torch.manual_seed(0)
    views = [train[7][0] for _ in range(6)]
    assert all(v.shape == (3, 32, 32) and v.min() >= 0 and v.max() <= 1 for v in views)
    # A random crop (81 offsets) x flip (2) makes 6 identical draws have probability 162^-5; seeded anyway.
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(plain[7][0], plain[7][0])
    # Every view is a 32 x 32 window of the zero-padded (4 px) image, possibly mirrored.
    padded = torch.nn.functional.pad(plain[7][0], (4, 4, 4, 4))
    windows = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    for view in views:
        assert any(torch.equal(view, w) or torch.equal(view, w.flip(-1)) for w in windows)


def test_subset_is_deterministic_balanced_and_nested(cifar10_dir):
    a = build_dataset("cifar10", cifar10_dir, "test", subset=100, subset_seed=3)
    b = build_dataset("cifar10", cifar10_dir, "test", subset=100, subset_seed=3)
    c = build_dataset("cifar10", cifar10_dir, "test", subset=100, subset_seed=4)
    small = build_dataset("cifar10", cifar10_dir, "test", subset=30, subset_seed=3)
    assert len(a) == 100 and a.indices == b.indices and a.indices != c.indices
    assert np.bincount(dataset_labels(a), minlength=10).tolist() == [10] * 10  # rows are sorted by class
    assert np.bincount(a.targets, minlength=10).tolist() == [10] * 10
    assert set(small.indices) <= set(a.indices)
    assert torch.equal(a[5][0], build_dataset("cifar10", cifar10_dir, "test")[a.indices[5]][0])
    for bad in (0, 10_001, 2.5):
        with pytest.raises(ValueError, match=r"subset="):
            build_dataset("cifar10", cifar10_dir, "test", subset=bad)


def test_stratified_subset_on_unbalanced_labels():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    chosen = stratified_subset_indices(labels, 7, seed=0)
    # round robin: rank 0 of each class (3 rows), then rank 1 of classes 0 and 1, then rank 2 of 0 and 1
    assert np.bincount(labels[chosen], minlength=3).tolist() == [3, 3, 1]
    assert len(set(chosen.tolist())) == 7 and np.all(np.diff(chosen) > 0)


def test_dataloader_workers_and_pickling(cifar10_dir):
    subset = build_dataset("cifar10", cifar10_dir, "train", subset=64, subset_seed=0)
    base = subset.dataset
    base[0]
    clone = pickle.loads(pickle.dumps(base))
    assert clone.cached_row_groups == 0
    assert np.array_equal(clone.targets, base.targets)
    loader = DataLoader(subset, batch_size=16, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    labels = []
    for images, batch_labels in loader:
        assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
        labels += batch_labels.tolist()
    assert sorted(labels) == sorted(subset.targets.tolist())


def test_load_images(cifar10_dir):
    test = build_dataset("cifar10", cifar10_dir, "test")
    indices = [9999, 0, 5000, 42]
    images, labels = load_images("cifar10", cifar10_dir, "test", indices)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [int(test.targets[i]) for i in indices]
    for row, i in enumerate(indices):
        assert torch.equal(images[row], test[i][0])
    empty_images, empty_labels = load_images("cifar10", cifar10_dir, "test", [])
    assert empty_images.shape == (0, 3, 32, 32) and empty_labels.shape == (0,)
    with pytest.raises(ValueError, match=r"index 10000 outside \[0, 10000\)"):
        load_images("cifar10", cifar10_dir, "test", [10_000])


def test_torchvision_cifar10_layout(tmp_path, monkeypatch):
    """torchvision's cifar-10-batches-py pickles (2 images per batch; md5 check stubbed out)."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        batch = {"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8), "labels": [k, 9 - k]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, handle)
    assert resolve_source("cifar10", tmp_path, "train") == "torchvision"
    train = build_dataset("cifar10", tmp_path, "train")
    test = build_dataset("cifar10", folder, "test")  # the batches folder itself works too
    assert (len(train), len(test)) == (10, 2) and dataset_labels(test).tolist() == [5, 4]
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle)["data"][1].reshape(3, 32, 32)
    image, label = test[1]
    assert label == 4 and image.dtype == torch.float32
    # CIFAR eval: no transform at all, pixels / 255 (up to float rounding of x * (1/255) vs x / 255)
    torch.testing.assert_close(image, torch.from_numpy(raw).float() / 255, rtol=0, atol=1e-6)
    assert train[0][0].shape == (3, 32, 32)


# -- ImageNet layouts --------------------------------------------------------------------------------

def test_imagenet_parquet_shards(imagenet_parquet):
    train = build_dataset("imagenet", imagenet_parquet, "train")
    val = build_dataset("imagenet", imagenet_parquet, "test")  # "test" reads val/
    assert (len(train), len(val)) == (8, 4)
    assert train.targets.tolist() == [0, 999, 17, 3, 0, 999, 17, 4]
    assert [train.locate(i)[1:] for i in (0, 3, 5)] == [(0, 0), (1, 1), (0, 1)]
    assert train.locate(5)[0].name == "part-00001.parquet"
    torch.manual_seed(0)
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 224, 224) and image.min() >= 0 and image.max() <= 1
        assert label == train.targets[i]
    images, labels = load_images("imagenet", imagenet_parquet, "test", [3, 2])
    assert images.shape == (2, 3, 224, 224) and labels.tolist() == [3, 17]
    assert torch.equal(images[0], val[3][0]) and torch.equal(val[3][0], val[3][0])


def test_imagenet_eval_transform_is_resize_then_center_crop(imagenet_parquet):
    """A 500 x 250 image: shorter side -> 256 (so 512 x 256), centre 224 crop."""
    val = build_dataset("imagenet", imagenet_parquet, "test")
    image = val[3][0]
    raw = val._row_group(1)[1].as_py()  # row 3 = row group 1, offset 1
    with Image.open(io.BytesIO(raw)) as pil:
        assert pil.size == (250, 500)
        resized = pil.convert("RGB").resize((256, 512), Image.BILINEAR)
    top, left = (512 - 224) // 2, (256 - 224) // 2
    expected = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
    expected = expected[:, top:top + 224, left:left + 224]
    # PIL's and torchvision's antialiased bilinear resize agree to a few levels; the crop window must match
    assert (image - expected / 255).abs().mean() < 2 / 255


def test_huggingface_style_parquet(tmp_path):
    """``train-00000-of-00001.parquet`` with image as struct<bytes, path>, as Hugging Face datasets write."""
    rng = np.random.default_rng(2)
    images = pa.array([{"bytes": jpeg_bytes(rng, 64, 80), "path": f"{i}.jpg"} for i in range(3)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array([5, 6, 7], type=pa.int16())}),
                   tmp_path / "train-00000-of-00001.parquet")
    train = build_dataset("imagenet", tmp_path, "train", augment=False)
    assert len(train) == 3 and train[1][0].shape == (3, 224, 224) and train[1][1] == 6


def test_imagenet_image_folder(imagenet_folder):
    assert resolve_source("imagenet", imagenet_folder, "test") == "imagefolder"
    train = build_dataset("imagenet", imagenet_folder, "train")
    val = build_dataset("imagenet", imagenet_folder, "test")
    assert len(train) == len(val) == 4 and dataset_labels(val).tolist() == [0, 0, 1, 1]
    image, label = train[3]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 1
    assert torch.equal(val[0][0], val[0][0])
    sub = build_dataset("imagenet", imagenet_folder, "test", subset=2, subset_seed=0)
    assert sorted(sub.targets.tolist()) == [0, 1]
    images, labels = load_images("imagenet", imagenet_folder, "test", [1, 2])
    assert images.shape == (2, 3, 224, 224) and labels.tolist() == [0, 1]


# -- errors ------------------------------------------------------------------------------------------

def test_missing_and_empty_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=rf"data_dir='{missing}': no such directory"):
        build_dataset("cifar10", missing, "train")
    with pytest.raises(ValueError, match=rf"data_dir='{tmp_path}': no CIFAR-10 'test' split found.*"
                                         r"test\.parquet.*cifar-10-batches-py"):
        build_dataset("cifar10", tmp_path, "test")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=rf"data_dir='{tmp_path}': no ImageNet 'train' split"):
        build_dataset("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match=r"source='torchvision'"):
        build_dataset("cifar10", tmp_path, "train", source="torchvision")
    (tmp_path / "train.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"parquet='.*train\.parquet': not a readable Parquet file"):
        build_dataset("cifar10", tmp_path, "train")
    (tmp_path / "train.parquet").write_text("not parquet at all, just text")
    with pytest.raises(ValueError, match=r"train\.parquet': not a readable Parquet file"):
        build_dataset("cifar10", tmp_path, "train")
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())])
    pq.write_table(schema.empty_table(), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"train\.parquet'.*holds no rows"):
        build_dataset("cifar10", tmp_path, "train")


def test_malformed_parquet(tmp_path):
    rng = np.random.default_rng(3)
    pq.write_table(pa.table({"img": [jpeg_bytes(rng, 8, 8)], "label": [1]}), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"train\.parquet'.*missing column\(s\) 'image'.*has img, label"):
        build_dataset("cifar10", tmp_path, "train")
    pq.write_table(pa.table({"image": ["text"], "label": [1]}), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"column 'image' has type string"):
        build_dataset("cifar10", tmp_path, "train")
    pq.write_table(pa.table({"image": [jpeg_bytes(rng, 8, 8)], "label": [10]}), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"label 10 outside \[0, 10\)"):
        build_dataset("cifar10", tmp_path, "train")


def test_unknown_values(tmp_path):
    with pytest.raises(ValueError, match=r"dataset='mnist'"):
        build_dataset("mnist", tmp_path, "train")
    with pytest.raises(ValueError, match=r"split='val'.*train, test"):
        build_dataset("cifar10", tmp_path, "val")
    with pytest.raises(ValueError, match=r"source='hdf5'"):
        build_dataset("cifar10", tmp_path, "train", source="hdf5")
    with pytest.raises(ValueError, match=r"source='torchvision'.*cifar10 only"):
        build_dataset("imagenet", tmp_path, "train", source="torchvision")
    with pytest.raises(ValueError, match=r"augment='yes'"):
        build_dataset("cifar10", tmp_path, "train", augment="yes")
