"""Datasets: ``build_dataset`` (training / evaluation sets) and ``load_images`` (certification inputs).

Sources (``source="auto"`` picks the first that exists for the requested split):

- ``parquet``: ``<data_dir>/<split>.parquet``, or a directory ``<data_dir>/<split>/*.parquet`` of shards,
  or shards ``<data_dir>/<split>-*.parquet`` (also under ``<data_dir>/data/``), columns ``image``
  (encoded bytes) and ``label``. Read lazily (:class:`ParquetImageDataset`).
- ``torchvision`` (CIFAR-10 only): torchvision's ``cifar-10-batches-py`` under ``data_dir``;
  ``download=True`` fetches it.
- ``imagefolder``: ``<data_dir>/<split>/<class>/<image>`` trees (classes = sorted folder names).

Split names on disk: CIFAR-10 ``train`` / ``test``; ImageNet ``train`` / ``val`` (``split="test"`` reads
``val``, or ``validation`` / ``test`` when no ``val`` exists).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from adre_ray.data.arrays import ArraysDataset, arrays_file
from adre_ray.data.info import DATASET_INFOS, SOURCES, SPLITS, dataset_info
from adre_ray.data.parquet import ParquetImageDataset
from adre_ray.data.transforms import image_transform

CIFAR10_TORCHVISION_DIR = "cifar-10-batches-py"

_SPLIT_DIRS: dict[tuple[str, str], tuple[str, ...]] = {
    ("cifar10", "train"): ("train",),
    ("cifar10", "test"): ("test",),
    ("imagenet", "train"): ("train",),
    ("imagenet", "test"): ("val", "validation", "test"),
}


class LabeledSubset(Subset):
    """``torch.utils.data.Subset`` that also exposes the chosen rows' labels as ``targets``."""

    @property
    def targets(self) -> np.ndarray:
        return dataset_labels(self.dataset)[np.asarray(self.indices, dtype=np.int64)]


def dataset_labels(ds: Dataset) -> np.ndarray:
    """All labels of ``ds`` (int64) without decoding images: from ``targets`` or a Subset's parent."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise ValueError(f"dataset={type(ds).__name__}: has no 'targets' to read labels from")
    return np.asarray(targets, dtype=np.int64)


def stratified_subset_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` row indices, sorted, drawn by a seeded round-robin over the classes.

    Rows are shuffled with ``numpy.random.default_rng(seed)``; each row's key is its rank among the
    shuffled rows of its class; the ``size`` rows of smallest key (ties: shuffled order) are taken. So
    every class present gets ``floor(size / C)`` or one more rows (until a class runs out), the choice
    is a deterministic function of (labels, size, seed), and a smaller subset is a prefix of a larger
    one with the same seed.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= n:
        raise ValueError(f"subset={size!r}: must be an integer in [1, {n}] (the split's size)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"subset_seed={seed!r}: must be an integer >= 0")
    perm = np.random.default_rng(int(seed)).permutation(n)
    shuffled = labels[perm]
    by_class = np.argsort(shuffled, kind="stable")  # grouped by class, shuffled order inside a class
    sorted_labels = shuffled[by_class]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    group_sizes = np.diff(np.r_[group_start, n])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - np.repeat(group_start, group_sizes)
    chosen = np.lexsort((np.arange(n), rank))[:size]  # primary key: rank; ties: shuffled position
    return np.sort(perm[chosen])


def seeded_subset(ds: Dataset, size: int, seed: int = 0) -> LabeledSubset:
    """A deterministic class-balanced random subset of ``ds`` (see :func:`stratified_subset_indices`)."""
    return LabeledSubset(ds, stratified_subset_indices(dataset_labels(ds), size, seed).tolist())


# -- source resolution -------------------------------------------------------------------------------

def _check_args(dataset: str, split: str, source: str) -> None:
    dataset_info(dataset)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: must be one of {', '.join(SOURCES)}")
    if source == "torchvision" and dataset != "cifar10":
        raise ValueError(f"source={source!r}: torchvision's layout is supported for cifar10 only "
                         f"(dataset={dataset!r}: use 'parquet' or 'imagefolder')")


def parquet_files(data_dir: Path, names: Sequence[str]) -> list[Path]:
    """The Parquet files of the first split name in ``names`` that has any (see module docstring)."""
    for name in names:
        for base in (data_dir, data_dir / "data"):
            single = base / f"{name}.parquet"
            if single.is_file():
                return [single]
            for folder in (single, base / name):  # a directory of shards (Spark writes <name>.parquet/)
                if folder.is_dir():
                    shards = sorted(p for p in folder.glob("*.parquet") if p.is_file())
                    if shards:
                        return shards
            shards = sorted(p for p in base.glob(f"{name}-*.parquet") if p.is_file())
            if shards:
                return shards
    return []


def _imagefolder_dir(data_dir: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        folder = data_dir / name
        if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
            return folder
    return None


def _torchvision_root(data_dir: Path) -> Path | None:
    if data_dir.name == CIFAR10_TORCHVISION_DIR and data_dir.is_dir():
        return data_dir.parent
    if (data_dir / CIFAR10_TORCHVISION_DIR).is_dir():
        return data_dir
    return None


def _expected_layout(dataset: str, split: str) -> str:
    names = _SPLIT_DIRS[(dataset, split)]
    parquet = " or ".join(f"{n}.parquet / {n}/*.parquet" for n in names)
    folders = " or ".join(f"{n}/<class>/*.jpg" for n in names)
    text = f"expected {parquet}, or image folders {folders}"
    if dataset == "cifar10":
        text += f", or torchvision's {CIFAR10_TORCHVISION_DIR} (download=True fetches it)"
    return text


def resolve_source(dataset: str, data_dir: str | Path, split: str, source: str = "auto",
                   download: bool = False) -> str:
    """The concrete source ``build_dataset`` would read for these arguments (``ValueError`` if none)."""
    _check_args(dataset, split, source)
    data_dir = Path(data_dir).expanduser()
    names = _SPLIT_DIRS[(dataset, split)]
    label = "CIFAR-10" if dataset == "cifar10" else "ImageNet"
    will_download = download and source in ("auto", "torchvision") and dataset == "cifar10"
    if not data_dir.is_dir() and not will_download:
        what = "not a directory" if data_dir.exists() else "no such directory"
        raise ValueError(f"data_dir={str(data_dir)!r}: {what} (looking for {label} {split!r} split: "
                         f"{_expected_layout(dataset, split)})")
    found = {
        "parquet": lambda: bool(data_dir.is_dir() and parquet_files(data_dir, names)),
        "torchvision": lambda: _torchvision_root(data_dir) is not None,
        "imagefolder": lambda: data_dir.is_dir() and _imagefolder_dir(data_dir, names) is not None,
    }
    candidates = [source] if source != "auto" else (
        ["parquet", "torchvision", "imagefolder"] if dataset == "cifar10" else ["parquet", "imagefolder"])
    for candidate in candidates:
        if found[candidate]():
            return candidate
    if dataset == "cifar10" and download and source in ("auto", "torchvision"):
        return "torchvision"
    where = f"no {label} {split!r} split" + (f" for source={source!r}" if source != "auto" else "")
    raise ValueError(f"data_dir={str(data_dir)!r}: {where} found ({_expected_layout(dataset, split)})")


def build_dataset(dataset: str, data_dir: str | Path, split: str, *, source: str = "auto",
                  augment: bool | None = None, subset: int | None = None, subset_seed: int = 0,
                  download: bool = False) -> Dataset:
    """The ``split`` of ``dataset`` as a map-style Dataset of (float32 [0, 1] image C x H x W, int label).

    ``augment`` defaults to ``split == "train"``. ``subset`` keeps a seeded class-balanced random subset
    of that many images (deterministic in ``subset_seed``). Raises ``ValueError`` naming the bad value or
    path when the data is missing, empty or malformed.
    """
    if dataset == "arrays":  # samples as they are: no transform, no augmentation
        ds = arrays_dataset(data_dir, split)
        return seeded_subset(ds, subset, subset_seed) if subset is not None else ds
    _check_args(dataset, split, source)
    if augment is None:
        augment = split == "train"
    if not isinstance(augment, bool):
        raise ValueError(f"augment={augment!r}: must be true, false or None")
    info = dataset_info(dataset)
    data_dir = Path(data_dir).expanduser()
    resolved = resolve_source(dataset, data_dir, split, source, download)
    transform = image_transform(dataset, augment=augment)
    names = _SPLIT_DIRS[(dataset, split)]
    ds: Dataset
    if resolved == "parquet":
        ds = ParquetImageDataset(parquet_files(data_dir, names), transform, num_classes=info.num_classes)
    elif resolved == "torchvision":
        ds = _torchvision_cifar10(data_dir, split, transform, download)
    else:
        ds = _image_folder(_imagefolder_dir(data_dir, names), transform, info.num_classes)  # type: ignore[arg-type]
    if len(ds) == 0:  # type: ignore[arg-type]
        raise ValueError(f"data_dir={str(data_dir)!r}: the {split!r} split of {dataset!r} is empty")
    if subset is not None:
        ds = seeded_subset(ds, subset, subset_seed)
    return ds


def _torchvision_cifar10(data_dir: Path, split: str, transform, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    root = _torchvision_root(data_dir) or data_dir
    try:
        return CIFAR10(str(root), train=split == "train", transform=transform, download=download)
    except RuntimeError as err:  # "Dataset not found or corrupted"
        raise ValueError(f"data_dir={str(data_dir)!r}: torchvision CIFAR-10 not usable ({err})") from err


def _image_folder(folder: Path, transform, num_classes: int) -> Dataset:
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise ValueError(f"data_dir={str(folder)!r}: not a usable image folder ({err})") from err
    if len(ds.classes) > num_classes:
        raise ValueError(f"data_dir={str(folder)!r}: {len(ds.classes)} class folders, more than the "
                         f"dataset's {num_classes} classes")
    return ds


# -- certification inputs ----------------------------------------------------------------------------

def arrays_dataset(data_dir: str | Path, split: str, num_classes: int | None = None) -> ArraysDataset:
    """The ``split`` of an arrays dataset (``adre_ray.data.arrays``): ``data_dir`` is the split's file, or a
    folder holding ``<split>.npz`` / ``<split>.parquet`` / ``<split>/*.parquet``; checked when read."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    ds = ArraysDataset(arrays_file(data_dir, split), num_classes=num_classes)
    if len(ds) == 0:
        raise ValueError(f"data_dir={str(data_dir)!r}: the {split!r} arrays are empty")
    return ds


@functools.lru_cache(maxsize=4)
def _eval_dataset(dataset: str, data_dir: str, split: str, source: str) -> Dataset:
    return build_dataset(dataset, data_dir, split, source=source, augment=False)


def load_images(dataset: str, data_dir: str | Path, split: str, indices: Sequence[int], *,
                source: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` of a split with the eval transform: (N, C, H, W) float32 in [0, 1], (N,) int64.

    Every image's shape must be (3, S, S), S the dataset's ``image_size`` (after the eval transform:
    ImageNet is resized and cropped, CIFAR-10 is taken as is); otherwise ``ValueError`` naming the file,
    row group and row (Parquet) or the index. Parquet reads only the row groups holding those rows.
    The eval dataset of (dataset, data_dir, split, source) is cached per process, so repeated calls (one
    per image batch of a certification job) do not rescan the labels.
    """
    if dataset != "arrays":
        _check_args(dataset, split, source)
    data_dir = str(Path(data_dir).expanduser().resolve())
    ds = _eval_dataset(dataset, data_dir, split, source)
    n = len(ds)  # type: ignore[arg-type]
    idx = list(indices)
    for i in idx:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise ValueError(f"indices: index {i!r} outside [0, {n}) for the {split!r} split of {dataset!r}")
    if isinstance(ds, ArraysDataset):  # any sample shape, as stored
        samples = torch.from_numpy(np.stack([ds.sample(int(i)) for i in idx]) if idx
                                   else np.empty((0, *ds.sample_shape), np.float32))
        return samples, torch.as_tensor(ds.targets[np.asarray(idx, dtype=np.int64)], dtype=torch.int64)
    if not idx:
        size = DATASET_INFOS[dataset].image_size
        return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.int64)
    pairs = [ds[int(i)] for i in idx]
    expected = (3, DATASET_INFOS[dataset].image_size, DATASET_INFOS[dataset].image_size)
    for i, (image, _) in zip(idx, pairs, strict=True):
        if tuple(image.shape) != expected:
            raise ValueError(f"{_image_location(ds, int(i))}: image shape {tuple(image.shape)} after the "
                             f"eval transform, but {dataset!r} images are {expected} (C, H, W); a "
                             "certificate of another input size would be about another input space")
    labels = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    return torch.stack([image for image, _ in pairs]), labels


def _image_location(ds: Dataset, index: int) -> str:
    """Where image ``index`` of ``ds`` lives: file, row group and row for Parquet, else the index."""
    if isinstance(ds, ParquetImageDataset):
        path, group, offset = ds.locate(index)
        return f"parquet={str(path)!r}: row {offset} of row group {group} (image idx {index})"
    return f"image idx {index}"
