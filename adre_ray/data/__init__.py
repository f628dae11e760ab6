"""Datasets (pure PyTorch, no Ray): CIFAR-10 and ImageNet from Parquet, torchvision or image folders.

Images come out as float32 [0, 1] tensors, un-normalized (the model normalizes), so Gaussian noise and
certified radii are in pixel space. Names are imported on first use (``adre_ray.lazy``):
``adre_ray.data.info`` (dataset names, splits, layouts) imports without torch.
"""

from adre_ray.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("LabeledSubset", "build_dataset", "dataset_labels", "load_images", "parquet_files",
                     "resolve_source", "seeded_subset", "stratified_subset_indices"), "datasets"),
    **dict.fromkeys(("DATASETS", "DATASET_INFOS", "SOURCES", "SPLITS", "DatasetInfo", "dataset_info"),
                    "info"),
    **dict.fromkeys(("DEFAULT_CACHE_BYTES", "ParquetImageDataset", "decode_image_bytes"), "parquet"),
    "image_transform": "transforms",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
