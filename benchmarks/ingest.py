"""Training input: decoded-and-augmented ImageNet images/s per CPU core, and bytes read per shuffled epoch.

    .venv/bin/python benchmarks/ingest.py --images 1024 --cores 1 2
    .venv/bin/python benchmarks/ingest.py --images 4096 --cores 1 2 4 8 --rows-per-file 512

Data: ``--images`` synthetic ImageNet-sized JPEGs (500 x 375, a smooth gradient plus pixel noise at
quality 90, about 90 KB each like ImageNet's ~110 KB), written as Parquet shards the way
``adre-ray convert`` writes them (``--rows-per-file``, ``--rows-per-group``).

1. Throughput (RandomResizedCrop 224 + flip, uint8 out for Ray Data / float32 for the DataLoader):
   - ``torch``: today's loader, ``ParquetImageDataset`` + ``image_transform("imagenet", augment=True)`` in a
     ``torch.utils.data.DataLoader`` with ``c`` worker processes (one torch thread each), shuffled;
   - ``ray_data``: ``adre_ray.distributed.ingest``'s pipeline (``read_parquet`` ->
     ``map_batches(decode_batch)``) on a fresh local Ray with ``num_cpus=c``, consumed with ``iter_batches``.
   Each is timed over a second epoch, from its first batch to its last (steady state: the first epoch
   starts the processes; Ray Data's per-epoch start, ~2-3 s of file listing here, is left out). Reported:
   wall-clock images/s, per core (/ c), the speed-up from 1 core, and, as a load-proof measure,
   images per CPU-second of the decode function alone in this process (``time.process_time``).
2. Bytes read per shuffled epoch / dataset bytes (the files' sizes):
   - ``torch``: a DistributedSampler-shuffled epoch through ``ParquetImageDataset``'s row-group cache with
     ``cache_bytes`` = ``--cache-fraction`` x the dataset (default 256 MiB / 140 GB, today's default cache
     against ImageNet's train split), counting the compressed bytes of every row group it reads;
   - ``ray_data``: a file-shuffled epoch through ``read_parquet`` on a counting pyarrow filesystem that
     logs every byte the read tasks pull from the files.
Targets (issue 14): ray_data bytes ratio <= 1.1; >= 300 images/s per core; >= 1.8x from 1 to 2 cores.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from _common import machine_line

from adre_ray.data.convert import SCHEMA

IMAGENET_TRAIN_BYTES = 140e9
DEFAULT_CACHE_BYTES = 256 * 2**20


def synthetic_jpegs(count: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for i in range(count):
        phase = i % 7
        blue = (x + y + 40 * phase) * 128 / (width + height)
        base = np.stack([x * 255 / width, y * 255 / height, blue], -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shards(images: list[bytes], folder: Path, rows_per_file: int, rows_per_group: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, len(images), rows_per_file)):
        part = images[start:start + rows_per_file]
        table = pa.table({"image": pa.array(part, pa.binary()),
                          "label": pa.array([(start + i) % 1000 for i in range(len(part))], pa.int16()),
                          "source_path": pa.array([f"{start + i}.JPEG" for i in range(len(part))])},
                         schema=SCHEMA)
        path = folder / f"part-{k:05d}.parquet"
        pq.write_table(table, path, row_group_size=rows_per_group)
        files.append(str(path))
    return files


# -- throughput ----------------------------------------------------------------------------------------

def torch_loader_rate(files: list[str], cores: int, batch: int, block_bytes: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    from adre_ray.data import ParquetImageDataset, image_transform

    ds = ParquetImageDataset(files, image_transform("imagenet", augment=True), num_classes=1000)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=cores,
                        worker_init_fn=lambda _: torch.set_num_threads(1), persistent_workers=True)
    for _ in loader:  # warm-up epoch: workers started, files opened
        pass
    return _steady_rate(iter(loader), lambda b: len(b[0]))


def _steady_rate(batches: Any, size: Any) -> float:
    """Images/s from the first batch to the last (the start-up latency of an epoch left out)."""
    next(batches)
    started, images = time.perf_counter(), 0
    for b in batches:
        images += size(b)
    return images / (time.perf_counter() - started)


def ray_data_rate(files: list[str], cores: int, batch: int, block_bytes: int) -> float:
    import ray

    from adre_ray.config.train import TrainConfig
    from adre_ray.distributed.ingest import _decoded

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().target_max_block_size = block_bytes
    try:
        cfg = TrainConfig().replace(**{"data.dataset": "imagenet", "data.decode_batch_size": batch})
        ds = _decoded(files, cfg, augment=True, shuffle_seed=0)
        for _ in ds.iter_batches(batch_size=batch, batch_format="numpy"):  # warm-up epoch: workers started
            pass
        return _steady_rate(iter(ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2)),
                            lambda b: len(b["label"]))
    finally:
        ray.shutdown()


def cpu_rates(images: list[bytes]) -> dict[str, float]:
    """Images per CPU-second of each decode + augment function, one thread, in this process."""
    import torch

    from adre_ray.data import decode_image_bytes, image_transform
    from adre_ray.data.batches import decode_batch

    torch.set_num_threads(1)
    transform = image_transform("imagenet", augment=True)
    batch = {"image": np.array(images, dtype=object), "label": np.zeros(len(images), dtype=np.int64)}
    rates = {}
    for name, run in (("torch", lambda: [transform(decode_image_bytes(b)) for b in images]),
                      ("ray_data", lambda: decode_batch(batch, dataset="imagenet", augment=True))):
        run()  # warm-up
        started = time.process_time()
        run()
        rates[name] = len(images) / (time.process_time() - started)
    return rates


# -- bytes read ----------------------------------------------------------------------------------------

def torch_epoch_bytes(files: list[str], cache_bytes: int, seed: int = 0) -> int:
    """Compressed bytes of the image row groups a shuffled epoch loads through the row-group cache."""
    import torch
    from torch.utils.data import DistributedSampler

    from adre_ray.data import ParquetImageDataset

    ds = ParquetImageDataset(files, None, num_classes=1000, cache_bytes=cache_bytes)
    sizes = {}
    for k, (file_idx, group) in enumerate(ds._locations):
        meta = pq.ParquetFile(ds.files[file_idx]).metadata.row_group(group)
        image_col = [meta.column(c).path_in_schema for c in range(meta.num_columns)].index("image")
        sizes[k] = meta.column(image_col).total_compressed_size
    read = 0
    original = ds._row_group

    def counting(k: int) -> Any:
        nonlocal read
        if k not in ds._cache:
            read += sizes[k]
        return original(k)

    ds._row_group = counting  # type: ignore[method-assign]
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    torch.manual_seed(seed)
    for index in sampler:
        k, offset = ds._position(index)
        ds._row_group(k)[offset]
    return read


class CountingHandler(pafs.FileSystemHandler):
    """A local pyarrow filesystem that appends the bytes every opened file serves to ``log_dir/<pid>``."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CountingHandler) and other.log_dir == self.log_dir

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "counting-local"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def open_input_file(self, path: str) -> Any:
        return pa.PythonFile(_CountingReader(self.fs.open_input_file(path), self.log_dir), mode="r")

    def open_input_stream(self, path: str) -> Any:
        return pa.PythonFile(_CountingReader(self.fs.open_input_file(path), self.log_dir), mode="r")

    def create_dir(self, path: str, recursive: bool) -> None:
        raise NotImplementedError

    delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = move = copy_file = create_dir
    open_output_stream = open_append_stream = create_dir


class _CountingReader:
    def __init__(self, raw: Any, log_dir: str) -> None:
        self.raw, self.log_dir, self.closed = raw, log_dir, False

    def _log(self, count: int) -> None:
        with open(os.path.join(self.log_dir, str(os.getpid())), "a") as handle:
            handle.write(f"{count}\n")

    def read(self, nbytes: int = -1) -> bytes:
        data = self.raw.read() if nbytes is None or nbytes < 0 else self.raw.read(nbytes)
        self._log(len(data))
        return data

    def seek(self, position: int, whence: int = 0) -> int:
        return self.raw.seek(position, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def size(self) -> int:
        return self.raw.size()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.raw.close()


def ray_data_epoch_bytes(files: list[str], log_dir: str, cores: int, seed: int = 0) -> int:
    import ray
    from ray.data import FileShuffleConfig

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        fs = pafs.PyFileSystem(CountingHandler(log_dir))
        ds = ray.data.read_parquet(files, filesystem=fs, shuffle=FileShuffleConfig(seed=seed))
        ds = ds.select_columns(["image", "label"])
        for _ in ds.iter_batches(batch_size=256, batch_format="pyarrow", local_shuffle_buffer_size=1000,
                                 local_shuffle_seed=seed):
            pass
    finally:
        ray.shutdown()
    return sum(int(line) for name in os.listdir(log_dir) for line in Path(log_dir, name).read_text().split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rows-per-file", type=int, default=256)
    parser.add_argument("--rows-per-group", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache-fraction", type=float, default=DEFAULT_CACHE_BYTES / IMAGENET_TRAIN_BYTES,
                        help="torch row-group cache as a fraction of the dataset (default: 256 MiB / 140 GB)")
    parser.add_argument("--block-mb", type=float, default=8.0,
                        help="Ray Data's target block size (its default, 128 MB, splits an ImageNet shard of "
                             "~1 GB into ~9 decode tasks; a small benchmark needs smaller blocks)")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    import torch

    print(machine_line(torch.device("cpu")))
    print(f"load average before: {os.getloadavg()}")
    images = synthetic_jpegs(args.images)
    with tempfile.TemporaryDirectory(prefix="adre_ingest_") as tmp:
        files = write_shards(images, Path(tmp, "train"), args.rows_per_file, args.rows_per_group)
        dataset_bytes = sum(os.path.getsize(f) for f in files)
        print(f"{len(images)} JPEGs 500x375, mean {np.mean([len(b) for b in images]) / 1e3:.0f} KB; "
              f"{len(files)} files, {dataset_bytes / 1e6:.1f} MB, row groups of {args.rows_per_group}")
        cache = int(args.cache_fraction * dataset_bytes)
        torch_bytes = torch_epoch_bytes(files, cache)
        log_dir = Path(tmp, "reads")
        log_dir.mkdir()
        ray_bytes = ray_data_epoch_bytes(files, str(log_dir), max(args.cores))
        print(f"bytes read per shuffled epoch / dataset bytes: torch {torch_bytes / dataset_bytes:.2f}x "
              f"(row-group cache {cache / 1e6:.2f} MB), ray_data {ray_bytes / dataset_bytes:.2f}x")
        if args.skip_throughput:
            return 0
        rates = cpu_rates(images[:256])
        print("decode + RandomResizedCrop 224 + flip per CPU-second (one thread, this process): "
              + ", ".join(f"{name} {rate:.0f} images/s" for name, rate in rates.items()))
        for name, rate_fn in (("torch", torch_loader_rate), ("ray_data", ray_data_rate)):
            first = None
            for cores in args.cores:
                rate = rate_fn(files, cores, args.batch_size, int(args.block_mb * 2**20))
                first = first or rate
                print(f"{name:<9} {cores} core(s): {rate:7.0f} images/s, {rate / cores:5.0f} per core, "
                      f"{rate / first:.2f}x of 1 core   (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
