"""Static facts about the supported datasets: their names, class count, per-channel pixel statistics, input
size, and the splits and folder layouts they are read from (plain Python: the configs import them)."""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("cifar10", "imagenet", "arrays")
"""``arrays``: any fixed-shape samples given as .npz / Parquet arrays (adre_ray.data.arrays)."""
SPLITS = ("train", "test")
SOURCES = ("auto", "parquet", "torchvision", "imagefolder")
"""Folder layouts of a dataset (``adre_ray.data.resolve_source``); auto = detected."""


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset's constants. ``mean``/``std`` are per RGB channel of [0, 1] pixels."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int


DATASET_INFOS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32),
    "imagenet": DatasetInfo("imagenet", 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ``ValueError`` naming it for an unknown dataset."""
    try:
        return DATASET_INFOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"dataset={name!r}: unknown dataset (known: {', '.join(DATASET_INFOS)})") from None
