"""Datasets (pure PyTorch, no Ray): CIFAR-10 and ImageNet from Parquet, torchvision or image folders.

Images come out as float32 [0, 1] tensors, un-normalized (the model normalizes), so Gaussian noise and
certified radii are in pixel space.
"""

from adre_ray.data.datasets import (
    SOURCES,
    SPLITS,
    LabeledSubset,
    build_dataset,
    dataset_labels,
    load_images,
    parquet_files,
    resolve_source,
    seeded_subset,
    stratified_subset_indices,
)
from adre_ray.data.info import DATASET_INFOS, DatasetInfo, dataset_info
from adre_ray.data.parquet import DEFAULT_CACHE_BYTES, ParquetImageDataset, decode_image_bytes
from adre_ray.data.transforms import image_transform

__all__ = [
    "DATASET_INFOS",
    "DEFAULT_CACHE_BYTES",
    "SOURCES",
    "SPLITS",
    "DatasetInfo",
    "LabeledSubset",
    "ParquetImageDataset",
    "build_dataset",
    "dataset_info",
    "dataset_labels",
    "decode_image_bytes",
    "image_transform",
    "load_images",
    "parquet_files",
    "resolve_source",
    "seeded_subset",
    "stratified_subset_indices",
]
