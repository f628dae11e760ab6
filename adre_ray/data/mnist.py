"""MNIST's IDX files as arrays (the recipe of ``examples/levine2020/mnist_to_npz.py``; numpy only).

IDX: a big-endian header (magic ``0x00000803`` for images, ``0x00000801`` for labels; then the count,
and rows, cols for images), then unsigned bytes; ``.gz`` files are read through gzip.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array of an IDX file (images (N, rows, cols), labels (N,)); ``ValueError`` naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ValueError(f"idx={str(path)!r}: cannot be read ({err})") from err
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    dims = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}.get(magic)  # type: ignore[arg-type]
    if dims is None:
        raise ValueError(f"idx={str(path)!r}: magic {magic!r} is neither MNIST images nor labels")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"idx={str(path)!r}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def mean_pool(images: np.ndarray, pool: int) -> np.ndarray:
    """(N, H, W) -> (N, H / pool, W / pool): the mean of each pool x pool block (pool must divide H, W)."""
    n, h, w = images.shape
    if h % pool or w % pool:
        raise ValueError(f"pool={pool}: must divide the image size {h}x{w}")
    return images.reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4), dtype=np.float32)


def mnist_arrays(images_file: str | Path, labels_file: str | Path,
                 pool: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: x (N, 1, 28 / pool, 28 / pool) float32 in [0, 1] (pixels / 255, then the ``pool`` x
    ``pool`` block means), y (N,) int64."""
    images = read_idx(images_file).astype(np.float32) / np.float32(255.0)
    labels = read_idx(labels_file).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"images={str(images_file)!r}, labels={str(labels_file)!r}: shapes {images.shape} "
                         f"and {labels.shape} are not N images and N labels")
    if pool > 1:
        images = mean_pool(images, pool)
    return np.ascontiguousarray(images[:, None]), labels
