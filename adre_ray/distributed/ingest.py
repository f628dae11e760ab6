"""Training input through Ray Data: Parquet (local or any pyarrow-filesystem URI) -> decode + augment on CPU
tasks -> each Ray Train worker's shard as torch batches.

Pipeline (``data.loader: ray_data``), built once on the driver and handed to ``TorchTrainer(datasets=...)``:

- ``ray.data.read_parquet(files, shuffle=FileShuffleConfig(seed=run.seed))``: the file order is
  shuffled anew for every epoch (Ray reseeds with (seed, execution index)); each file is read once per
  epoch, streamed, so an epoch reads about the dataset's bytes once;
- ``map_batches(decode_batch)``: decode + augment (:mod:`adre_ray.data.batches`) in Ray tasks that
  reserve ``data.decode_cpus`` CPUs each, wherever the cluster has free CPUs (CPU-only nodes included);
  images travel as uint8;
- ``DataConfig(datasets_to_split="all")``: ``streaming_split`` gives each worker a disjoint part of every
  epoch; on the worker, :func:`torch_batches` runs ``iter_torch_batches`` with a local shuffle buffer of
  ``data.shuffle_buffer`` rows seeded by (seed, epoch, rank), ``data.prefetch_batches`` batches of
  prefetch, and converts to float32 [0, 1] on the worker's device.

Evaluation: with a local ``data_dir`` the per-epoch evaluation keeps the map-style test subset (the same
seeded class-balanced ``data.test_subset`` as the torch loader); with a URI it is a second Ray Data
dataset (eval transform, file order sorted, order preserved, the first ``data.test_subset`` rows:
converter output is row-shuffled, so those are a random sample).

What is not reproducible: which rows each worker gets in an epoch and the order of blocks follow Ray
Data's task completion order, and augmentation draws come from fresh OS entropy in every decode task.
With ``data.deterministic: true`` (``preserve_order``) and ``data.augment: false`` the batches of a run
with one worker are a function of the seed; resuming restarts Ray Data's execution count, so the epochs
after a resume see other file orders than an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adre_ray import storage
from adre_ray.config.train import TrainConfig

TRAIN_KEY = "train"
TEST_KEY = "test"
_SPLIT_NAMES = {("cifar10", "train"): ("train",), ("cifar10", "test"): ("test",),
                ("imagenet", "train"): ("train",), ("imagenet", "test"): ("val", "validation", "test")}


def _pick_split(paths: list[str], root: str, names: tuple[str, ...]) -> list[str]:
    """The files of the first split name with any, among sorted ``paths`` under ``root``."""
    for name in names:
        for base in (root, f"{root}/data"):
            parts = [p.rsplit("/", 1) for p in paths]
            single = [p for p in paths if p == f"{base}/{name}.parquet"]
            folder = [f"{d}/{f}" for d, f in parts if d in (f"{base}/{name}", f"{base}/{name}.parquet")]
            dashed = [f"{d}/{f}" for d, f in parts if d == base and f.startswith(f"{name}-")]
            if single or folder or dashed:
                return single or folder or dashed
    return []


def parquet_split_files(data_dir: str, dataset: str, split: str) -> list[str]:
    """The Parquet files of ``split`` under ``data_dir`` (local path or URI), in sorted order.

    Layouts as :func:`adre_ray.data.parquet_files`: ``<name>.parquet``, a folder ``<name>/*.parquet``
    (the converter's), or ``<name>-*.parquet``, also under ``data/``. ``ValueError`` naming ``data_dir``
    when there are none."""
    names = _SPLIT_NAMES[(dataset, split)]
    if not storage.is_remote(data_dir):
        from adre_ray.data import parquet_files

        local = Path(data_dir.removeprefix("file://")).expanduser()
        files = [str(p.resolve()) for p in parquet_files(local, names)] if local.is_dir() else []
    else:
        try:
            root, infos = storage.walk_files(data_dir)
        except OSError as err:
            raise ValueError(f"data.data_dir={data_dir!r}: cannot list it ({err})") from err
        paths = sorted(info.path for info in infos if info.path.endswith(".parquet"))
        files = [storage.as_uri_of(data_dir, p) for p in _pick_split(paths, root, names)]
    if not files:
        raise ValueError(f"data.data_dir={data_dir!r}: no Parquet files of the {split!r} split "
                         f"(expected {' or '.join(f'{n}.parquet / {n}/*.parquet' for n in names)})")
    return files


def resolve_loader(cfg: TrainConfig) -> str:
    """``ray_data`` or ``torch`` for ``data.loader``. ``auto``: Ray Data for ImageNet Parquet and for any
    URI ``data_dir``, when no ``data.train_subset`` is set; the torch DataLoader otherwise (CIFAR-10 fits
    in memory, image folders are read file by file)."""
    data = cfg.data
    if data.loader != "auto":
        return data.loader
    if data.train_subset is not None or data.dataset == "arrays":
        return "torch"
    if storage.is_remote(data.data_dir):
        return "ray_data"
    if data.dataset != "imagenet" or data.source not in ("auto", "parquet"):
        return "torch"
    from adre_ray.data import resolve_source

    try:
        return "ray_data" if resolve_source(data.dataset, data.data_dir, "train", data.source) == "parquet" \
            else "torch"
    except ValueError:
        return "torch"  # no data here (a remote cluster's path): the torch path reports it by name


def _decoded(files: list[str], cfg: TrainConfig, *, augment: bool, shuffle_seed: int | None) -> Any:
    import ray.data
    from ray.data import FileShuffleConfig

    from adre_ray.data.batches import decode_batch

    data = cfg.data
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(files, shuffle=shuffle, num_cpus=data.decode_cpus)
    ds = ds.select_columns(["image", "label"])
    return ds.map_batches(decode_batch, fn_kwargs={"dataset": data.dataset, "augment": augment},
                          batch_size=data.decode_batch_size, batch_format="numpy", num_cpus=data.decode_cpus)


def build_ray_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """``{"train": ...}`` (and ``"test"`` for a URI ``data_dir``) for ``TorchTrainer(datasets=...)``."""
    data = cfg.data
    if data.train_subset is not None:
        raise ValueError(f"data.train_subset={data.train_subset!r}: not supported with data.loader=ray_data "
                         "(use data.loader=torch)")
    train_files = parquet_split_files(data.data_dir, data.dataset, "train")
    datasets = {TRAIN_KEY: _decoded(train_files, cfg, augment=data.augment, shuffle_seed=cfg.run.seed)}
    if storage.is_remote(data.data_dir):
        test = _decoded(parquet_split_files(data.data_dir, data.dataset, "test"), cfg, augment=False,
                        shuffle_seed=None)
        datasets[TEST_KEY] = test.limit(data.test_subset) if data.test_subset is not None else test
    return datasets


def build_data_config(cfg: TrainConfig, datasets: dict[str, Any]) -> Any:
    """``DataConfig`` splitting every dataset over the workers; the test set (and with
    ``data.deterministic`` the train set too) keeps its order."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    options = {}
    for key in datasets:
        opts = ExecutionOptions()
        opts.preserve_order = key == TEST_KEY or cfg.data.deterministic
        options[key] = opts
    return DataConfig(datasets_to_split="all", execution_options=options)


def torch_batches(shard: Any, *, batch_size: int, device: Any, shuffle_buffer: int, prefetch_batches: int,
                  seed: int | None, drop_last: bool) -> Iterator[tuple[Any, Any]]:
    """``(float32 [0, 1] images (B, 3, S, S), int64 labels)`` on ``device`` from a worker's dataset shard."""
    import torch

    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                          prefetch_batches=prefetch_batches,
                                          local_shuffle_buffer_size=shuffle_buffer or None,
                                          local_shuffle_seed=seed if shuffle_buffer else None,
                                          dtypes={"image": torch.uint8, "label": torch.int64}):
        yield batch["image"].float().div_(255), batch["label"]


class ShardLoader:
    """One epoch of a worker's shard as an iterable of (images, labels) batches, with ``len`` = ``batches``
    (what the LR schedule plans with: ``DataConfig`` splits with ``equal=True``, so every worker gets
    ``rows // world_size`` rows and, with ``drop_last``, exactly ``batches`` full batches)."""

    def __init__(self, shard: Any, *, batches: int, **kwargs: Any) -> None:
        self.shard, self.batches, self.kwargs = shard, batches, kwargs

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return torch_batches(self.shard, **self.kwargs)


def parquet_row_count(files: list[str]) -> int:
    """Rows of ``files`` (local paths or URIs), from their footers only."""
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        fs, inner = storage.resolve(path) if storage.is_remote(path) else (None, path)
        total += pq.read_metadata(inner, filesystem=fs).num_rows
    return total


def worker_loaders(cfg: TrainConfig, *, rank: int, world_size: int, device: Any
                   ) -> tuple[Any, int, ShardLoader | None]:
    """On a Ray Train worker: (``epoch -> train batches``, batches per epoch, the Ray Data test loader or
    None when the test set is local and read map-style)."""
    import ray.train

    from adre_ray.training.seeds import rng_seed

    data, batch = cfg.data, cfg.per_worker_batch_size
    rows = parquet_row_count(parquet_split_files(data.data_dir, data.dataset, "train"))
    per_worker = rows // world_size
    if per_worker < batch:
        raise ValueError(f"batch_size={cfg.batch_size}: each of {world_size} workers gets {per_worker} "
                         f"training images, fewer than its batch of {batch}")
    train_shard = ray.train.get_dataset_shard(TRAIN_KEY)
    common = dict(batch_size=batch, device=device, prefetch_batches=data.prefetch_batches)

    def epoch_loader(epoch: int) -> ShardLoader:
        return ShardLoader(train_shard, batches=per_worker // batch, shuffle_buffer=data.shuffle_buffer,
                           seed=rng_seed(cfg.run.seed, epoch, rank), drop_last=True, **common)

    test_loader = None
    if storage.is_remote(data.data_dir):
        test_loader = ShardLoader(ray.train.get_dataset_shard(TEST_KEY), batches=0, shuffle_buffer=0,
                                  seed=None, drop_last=False, **common)
    return epoch_loader, per_worker // batch, test_loader
