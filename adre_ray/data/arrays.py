"""Datasets given as arrays (``dataset: arrays``): any fixed sample shape, in the model's input space.

A split is one of

- ``FILE.npz`` with ``x`` (N, ...) floating (float32; float64 is cast to float32) and ``y`` (N,) of any
  integer dtype (read as int64). Loaded whole (an ``.npz`` cannot be memory-mapped).
- Parquet (one file, or a folder of ``*.parquet`` files) with columns ``x``, an Arrow
  ``fixed_shape_tensor`` (``pa.fixed_shape_tensor(pa.float32(), shape)``), and ``y`` (integer). Read
  lazily: only ``y`` is read up front, ``x`` one row group at a time (a small per-process cache), so sets
  larger than memory work.

Samples are neither transformed nor augmented: noise is added to exactly these values, so radii are in
the arrays' coordinates. ``check_arrays`` refuses other dtypes, NaN / inf, negative labels (or labels
>= ``num_classes`` when known) and an x / y length mismatch, naming the array and the first bad row.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

ARRAY_SUFFIXES = (".npz", ".parquet")
_CACHED_GROUPS = 4


def arrays_file(data_dir: str | Path, split: str | None = None) -> list[Path]:
    """The file(s) of one split: ``data_dir`` itself when it is an ``.npz`` / ``.parquet`` file or a folder
    of ``*.parquet`` files; else (``split`` given) ``data_dir/<split>.npz``, ``<split>.parquet`` or
    ``<split>/*.parquet``. ``ValueError`` naming ``data_dir`` when there is none."""
    path = Path(data_dir).expanduser()
    if path.is_file():
        if path.suffix not in ARRAY_SUFFIXES:
            raise ValueError(f"data_dir={str(path)!r}: an arrays dataset is a .npz or .parquet file (or a "
                             "folder of them)")
        return [path]
    if path.is_dir():
        candidates = [path / f"{split}.npz", path / f"{split}.parquet", path / str(split)] if split else []
        for candidate in candidates:
            if candidate.is_file():
                return [candidate]
            if candidate.is_dir() and sorted(candidate.glob("*.parquet")):
                return sorted(candidate.glob("*.parquet"))
        shards = sorted(path.glob("*.parquet"))
        if shards and not split:
            return shards
    wanted = (f"{split}.npz, {split}.parquet or {split}/*.parquet inside it" if split
              else "a folder of *.parquet")
    raise ValueError(f"data_dir={str(path)!r}: no arrays found (expected a .npz / .parquet file, or "
                     f"{wanted})")


def check_arrays(x: np.ndarray, y: np.ndarray, source: str, *, num_classes: int | None = None,
                 first_row: int = 0, check_length: bool = True) -> None:
    """``ValueError`` naming ``source``, the array and the first bad row unless x is floating (float32 or
    float64) and finite, y integer and in [0, num_classes) (>= 0 when ``num_classes`` is None), and
    ``len(x) == len(y)``. ``first_row``: the row number of x[0] in the whole set (for chunked checks)."""
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{source}: array 'x' has dtype {x.dtype}, expected float32 (or float64)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: array 'y' has dtype {y.dtype}, expected an integer dtype")
    if x.ndim < 2:
        raise ValueError(f"{source}: array 'x' has shape {x.shape}, expected (N, ...) with a sample shape")
    if y.ndim != 1:
        raise ValueError(f"{source}: array 'y' has shape {y.shape}, expected (N,)")
    if check_length and len(x) != len(y):
        raise ValueError(f"{source}: array 'x' has {len(x)} rows but 'y' has {len(y)}")
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.size:
        raise ValueError(f"{source}: array 'x' row {first_row + int(bad[0])} holds NaN or inf")
    high = num_classes if num_classes is not None else None
    bad = np.flatnonzero((y < 0) | (y >= high if high is not None else False))
    if bad.size:
        limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{source}: array 'y' row {first_row + int(bad[0])} is {int(y[bad[0]])}, labels "
                         f"must be {limit}")


def _tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """Column ``x`` of a Parquet table as an (N, ...) ndarray (``fixed_shape_tensor`` only)."""
    column = table.column("x").combine_chunks()
    if not isinstance(column.type, pa.FixedShapeTensorType):
        raise ValueError(f"{name}: column 'x' has type {column.type}, expected a fixed_shape_tensor "
                         "(pa.fixed_shape_tensor(pa.float32(), shape))")
    if len(column) == 0:
        return np.empty((0, *column.type.shape), dtype=column.type.value_type.to_pandas_dtype())
    return column.to_numpy_ndarray()


class ArraysDataset(Dataset):
    """Rows of an arrays split as ``(x[i] float32 tensor of the sample shape, int y[i])``.

    ``targets`` holds every label (int64). ``sample_shape`` is the shape of one ``x`` row.
    """

    def __init__(self, files: Sequence[str | Path], *, num_classes: int | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.num_classes = num_classes
        self._x: np.ndarray | None = None
        self._groups: list[tuple[Path, int, int]] = []  # (file, row group, first row)
        self._cache: OrderedDict[tuple[Path, int], np.ndarray] = OrderedDict()
        if len(self.files) == 1 and self.files[0].suffix == ".npz":
            self._x, labels = self._read_npz(self.files[0])
        else:
            labels = self._index_parquet()
        self.targets = labels

    def _read_npz(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        name = f"arrays {str(path)!r}"
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [key for key in ("x", "y") if key not in npz.files]
                if missing:
                    raise ValueError(f"{name}: has no array {missing[0]!r} (arrays: {', '.join(npz.files)})")
                x, y = npz["x"], npz["y"]
        except (OSError, EOFError) as err:
            raise ValueError(f"{name}: not a readable .npz file ({err})") from err
        check_arrays(x, y, name, num_classes=self.num_classes)
        return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)

    def _index_parquet(self) -> np.ndarray:
        """Read and check ``y`` of every file, and ``x`` one row group at a time (bounded memory)."""
        labels: list[np.ndarray] = []
        first = 0
        shape = None
        for path in self.files:
            name = f"arrays {str(path)!r}"
            try:
                handle = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as err:
                raise ValueError(f"{name}: not a readable Parquet file ({err})") from err
            columns = handle.schema_arrow.names
            for key in ("x", "y"):
                if key not in columns:
                    raise ValueError(f"{name}: has no column {key!r} (columns: {', '.join(columns)})")
            for group in range(handle.num_row_groups):
                table = handle.read_row_group(group, columns=["x", "y"])
                x = _tensor_column(table, name)
                y = table.column("y").to_numpy(zero_copy_only=False)
                check_arrays(x, y, name, num_classes=self.num_classes, first_row=first)
                if shape is not None and x.shape[1:] != shape:
                    raise ValueError(f"{name}: column 'x' has sample shape {x.shape[1:]}, earlier files "
                                     f"{shape}")
                shape = x.shape[1:]
                if len(y):
                    self._groups.append((path, group, first))
                labels.append(y.astype(np.int64))
                first += len(y)
        self._sample_shape = shape
        return np.concatenate(labels) if labels else np.empty(0, np.int64)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._x.shape[1:]) if self._x is not None else tuple(self._sample_shape or ())

    def __len__(self) -> int:
        return len(self.targets)

    def _group_rows(self, position: int) -> np.ndarray:
        path, group, _ = self._groups[position]
        key = (path, group)
        if key not in self._cache:
            table = pq.ParquetFile(path).read_row_group(group, columns=["x"])
            self._cache[key] = np.ascontiguousarray(_tensor_column(table, str(path)), dtype=np.float32)
            while len(self._cache) > _CACHED_GROUPS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def sample(self, index: int) -> np.ndarray:
        """Row ``index`` of ``x`` (float32, the sample shape)."""
        if self._x is not None:
            return self._x[index]
        starts = [start for _, _, start in self._groups]
        position = int(np.searchsorted(starts, index, side="right")) - 1
        return self._group_rows(position)[index - starts[position]]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.sample(int(index)))), int(self.targets[index])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for i in range(len(self)):
            yield self[i]


def write_arrays_parquet(path: str | Path, x: np.ndarray, y: np.ndarray, *,
                         row_group_size: int = 4096) -> Path:
    """Write (x, y) as an arrays Parquet file (``x`` a ``fixed_shape_tensor`` column) and return its path."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    path = Path(path)
    pq.write_table(pa.table({"x": column, "y": pa.array(np.asarray(y, dtype=np.int64))}), path,
                   row_group_size=row_group_size)
    return path


__all__ = ["ARRAY_SUFFIXES", "ArraysDataset", "arrays_file", "check_arrays", "write_arrays_parquet"]
