"""Decode and augment whole batches of encoded images (numpy in, numpy out; no Ray).

The batch functions here are what Ray Data's ``map_batches`` runs on CPU nodes
(``adre_ray.distributed.ingest``), and what a plain Python loop can run too. A batch is a dict of numpy
arrays ``{"image": encoded bytes (object array), "label": ints}``; the result is
``{"image": uint8 (N, 3, S, S), "label": int64 (N,)}`` (uint8 keeps the object store and the transfer to
the training worker 4x smaller than float32; the worker divides by 255 on its device).

ImageNet (``S = 224``):

- train: RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip with p = 1/2, the
  crop box drawn exactly as torchvision's ``RandomResizedCrop.get_params`` (10 tries, then the centre
  crop of the clamped ratio), from the image size in the JPEG header;
- eval: Resize(256) (shorter side) + CenterCrop(224).

Images are decoded with torchvision's libjpeg-turbo decoder (:func:`adre_ray.data.decode_image_bytes`,
Pillow as fallback) and cut and resized with ``torchvision.transforms.v2.functional`` (antialiased
bilinear), on uint8 tensors, one torch thread per process as the caller sets it. CIFAR-10 (``S = 32``):
RandomCrop(32, padding=4) + flip, or nothing for eval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torchvision.transforms.v2 import functional as tvf

from adre_ray.data.info import dataset_info
from adre_ray.data.parquet import decode_image_bytes
from adre_ray.data.transforms import IMAGENET_RESIZE

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CIFAR_PADDING = 4


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height), distributed as torchvision's ``RandomResizedCrop.get_params``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: the centre crop of the clamped aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_resize(data: bytes, size: int, *, augment: bool, rng: np.random.Generator | None = None,
                resize: int = IMAGENET_RESIZE) -> np.ndarray:
    """Decode ``data`` -> uint8 (3, size, size): with ``augment``, the RandomResizedCrop box (drawn from
    ``rng``) resized to ``size`` and mirrored with probability 1/2; without, Resize(``resize``, shorter
    side) + CenterCrop(``size``)."""
    image = decode_image_bytes(data)
    height, width = image.shape[1:]
    if augment:
        assert rng is not None
        left, top, w, h = random_resized_crop_box(width, height, rng)
        out = tvf.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if rng.random() < 0.5:
            out = out.flip(-1)
    else:
        out = tvf.center_crop(tvf.resize(image, [resize], antialias=True), [size, size])
    return out.numpy()


def _cifar_image(data: bytes, size: int, augment: bool, rng: np.random.Generator) -> np.ndarray:
    pixels = decode_image_bytes(data).numpy()
    if pixels.shape[1:] != (size, size):
        raise ValueError(f"image: {pixels.shape[2]}x{pixels.shape[1]} pixels, expected {size}x{size}")
    if not augment:
        return pixels
    padded = np.pad(pixels, ((0, 0), (CIFAR_PADDING, CIFAR_PADDING), (CIFAR_PADDING, CIFAR_PADDING)))
    top, left = rng.integers(0, 2 * CIFAR_PADDING + 1, size=2)
    crop = padded[:, top:top + size, left:left + size]
    return crop[:, :, ::-1] if rng.random() < 0.5 else crop


def _imagenet_image(data: bytes, size: int, augment: bool, rng: np.random.Generator) -> np.ndarray:
    return crop_resize(data, size, augment=augment, rng=rng)


def _bytes_column(column: Any) -> list[bytes]:
    """Encoded images of a batch column: numpy object array of bytes, or of HF ``{"bytes": ...}`` dicts."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    return [v["bytes"] if isinstance(v, Mapping) else v for v in values]


def decode_batch(batch: Mapping[str, Any], *, dataset: str, augment: bool,
                 rng: np.random.Generator | None = None, image_column: str = "image",
                 label_column: str = "label") -> dict[str, np.ndarray]:
    """``{"image": encoded bytes, "label": ints}`` -> ``{"image": uint8 (N, 3, S, S), "label": int64}``.

    ``augment`` applies the training augmentation of ``dataset`` (module docstring) with random draws from
    ``rng`` (a fresh, OS-seeded generator when None). A row that does not decode raises ``ValueError``
    naming its position in the batch."""
    info = dataset_info(dataset)
    rng = rng if rng is not None else np.random.default_rng()
    one = _cifar_image if dataset == "cifar10" else _imagenet_image
    images = _bytes_column(batch[image_column])
    out = np.empty((len(images), 3, info.image_size, info.image_size), dtype=np.uint8)
    for i, data in enumerate(images):
        if data is None:
            raise ValueError(f"{image_column}: row {i} of the batch is null")
        try:
            out[i] = one(data, info.image_size, augment, rng)
        except ValueError as err:
            raise ValueError(f"{image_column}: row {i} of the batch: {err}") from err
    labels = np.asarray(batch[label_column], dtype=np.int64)
    return {image_column: out, label_column: labels}

