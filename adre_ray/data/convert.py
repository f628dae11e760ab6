"""ImageFolder tree -> Parquet shards (no Ray: plan, write one shard, check; Ray runs the shards in parallel).

Input: ``SRC/<split>/<class>/<image>`` for the split folders present among ``train``, ``val``,
``validation``, ``test``, or ``SRC/<class>/<image>`` (one split, named after ``SRC``). Output:
``DST/<split>/part-KKKKK-of-NNNNN-<plan id>.parquet`` with the schema the datasets read
(``adre_ray.data.ParquetImageDataset``, ``adre_ray.distributed.ingest``): ``image`` (binary, the file's
bytes as stored), ``label`` (int16, index of the class folder in the sorted class names), ``source_path``
(string, path relative to the split folder); the sorted class names are in the schema metadata
(``adre_ray.class_names``, JSON).

Rows are shuffled across shards with ``numpy.random.default_rng(seed)`` before cutting, so every shard
(and row group) mixes the classes: a file-order shuffle plus a local shuffle buffer then gives
well-mixed batches. The plan is a deterministic function of (file list, seed, rows per file), so a rerun
writes the same shard names; a shard whose file exists, is readable, and carries the same fingerprint
(``adre_ray.shard_digest``, a hash of its rows' source paths) is skipped. Each shard is written to a
temporary name and renamed into place, so a shard is either complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File endings accepted as images (torchvision ``ImageFolder``'s list), compared lower-cased."""
SPLIT_FOLDERS = ("train", "val", "validation", "test")
CLASS_NAMES_KEY = b"adre_ray.class_names"
SHARD_DIGEST_KEY = b"adre_ray.shard_digest"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int16()), ("source_path", pa.string())])


@dataclass(frozen=True)
class Shard:
    """One output file: ``rows`` = (relative path, label) pairs in the order written."""

    split: str
    index: int
    count: int
    rows: tuple[tuple[str, int], ...]
    plan_id: str = ""

    @property
    def name(self) -> str:
        """``part-KKKKK-of-NNNNN-<plan id>.parquet``: the plan id (a hash of the split's rows in shard
        order) keeps the shards of conversions with other settings apart."""
        return f"part-{self.index:05d}-of-{self.count:05d}-{self.plan_id}.parquet"

    @property
    def digest(self) -> str:
        text = "\n".join(f"{path}\t{label}" for path, label in self.rows)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SplitPlan:
    """One split: its source folder, sorted class names, images per class and output shards."""

    name: str
    folder: Path
    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]
    shards: tuple[Shard, ...]


def _split_folders(src: Path) -> dict[str, Path]:
    if not src.is_dir():
        raise ValueError(f"src={str(src)!r}: {'not a directory' if src.exists() else 'no such directory'}")
    named = {name: src / name for name in SPLIT_FOLDERS if (src / name).is_dir()}
    return named or {src.name: src}


def _scan_split(folder: Path) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"src={str(folder)!r}: empty (no class folders <class>/<image> in it)")
    files: dict[str, list[str]] = {}
    for name in classes:
        found = []
        for path in sorted((folder / name).rglob("*")):
            if path.is_dir() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"src={str(path)!r}: not an image file (expected one of "
                                 f"{', '.join(IMAGE_EXTENSIONS)})")
            found.append(path.relative_to(folder).as_posix())
        if not found:
            raise ValueError(f"src={str(folder / name)!r}: empty class folder (no images)")
        files[name] = found
    return tuple(classes), files


def plan_conversion(src: str | Path, *, rows_per_file: int, seed: int = 0) -> list[SplitPlan]:
    """Scan ``src`` and cut each split into shards (see the module docstring). Raises ``ValueError``
    naming the path for a missing or empty folder, an empty class folder, a non-image file, or train /
    evaluation splits whose class folders differ. Reads no image."""
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows_per_file={rows_per_file!r}: must be an integer >= 1")
    src = Path(src).expanduser()
    plans: list[SplitPlan] = []
    for split, folder in _split_folders(src).items():
        classes, files = _scan_split(folder)
        if plans and classes != plans[0].class_names:
            first = plans[0]
            only_first = sorted(set(first.class_names) - set(classes))[:5]
            only_this = sorted(set(classes) - set(first.class_names))[:5]
            raise ValueError(f"src={str(folder)!r}: class folders differ from {str(first.folder)!r} "
                             f"({len(classes)} vs {len(first.class_names)} classes; only in {first.name}: "
                             f"{only_first}, only in {split}: {only_this})")
        rows = [(path, label) for label, name in enumerate(classes) for path in files[name]]
        order = np.random.default_rng(seed).permutation(len(rows))
        shuffled = [rows[i] for i in order]
        count = -(-len(shuffled) // rows_per_file)
        plan_id = hashlib.sha256(f"{rows_per_file}\n".encode() + "\n".join(
            f"{path}\t{label}" for path, label in shuffled).encode()).hexdigest()[:10]
        shards = tuple(Shard(split, k, count, tuple(shuffled[k * rows_per_file:(k + 1) * rows_per_file]),
                             plan_id) for k in range(count))
        plans.append(SplitPlan(split, folder, classes, tuple(len(files[c]) for c in classes), shards))
    return plans


def shard_is_complete(path: Path, shard: Shard) -> bool:
    """True when ``path`` is a readable Parquet file written for exactly ``shard`` (same digest, rows)."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    kv = meta.metadata or {}
    return kv.get(SHARD_DIGEST_KEY) == shard.digest.encode() and meta.num_rows == len(shard.rows)


def _checked_bytes(path: Path) -> bytes:
    """The file's bytes, after decoding every pixel of them (``Image.load``; ``verify`` alone reads the
    header and structure only, so a truncated JPEG would pass and fail training later). ``ValueError``
    naming the file when Pillow cannot decode it whole (truncated, corrupt, not an image)."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes the whole image; a truncated file raises "image file is truncated"
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a bad file
        raise ValueError(f"src={str(path)!r}: not a readable image ({err})") from err
    return data


def write_shard(shard: Shard, folder: Path, class_names: tuple[str, ...], dst_dir: Path, *,
                rows_per_group: int) -> str:
    """Write ``shard`` to ``dst_dir/<split>/<name>`` atomically; skip it when already complete.

    Returns ``"written"`` or ``"skipped"``. A file that is not a readable image raises ``ValueError``
    naming it, and leaves no file behind for this shard."""
    out_dir = dst_dir / shard.split
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / shard.name
    if shard_is_complete(target, shard):
        return "skipped"
    images = [_checked_bytes(folder / path) for path, _ in shard.rows]
    table = pa.table({"image": pa.array(images, pa.binary()),
                      "label": pa.array([label for _, label in shard.rows], pa.int16()),
                      "source_path": pa.array([path for path, _ in shard.rows], pa.string())},
                     schema=SCHEMA.with_metadata({CLASS_NAMES_KEY: json.dumps(list(class_names)).encode(),
                                                  SHARD_DIGEST_KEY: shard.digest.encode()}))
    temp = out_dir / f".{shard.name}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, temp, row_group_size=rows_per_group)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return "written"


def check_no_foreign_files(plan: SplitPlan, dst_dir: Path) -> None:
    """ValueError naming a ``*.parquet`` file in ``dst_dir/<split>`` that this plan would not write (left
    by a conversion with other settings: the datasets would read its rows twice)."""
    out_dir = dst_dir / plan.name
    planned = {shard.name for shard in plan.shards}
    foreign = sorted(p.name for p in out_dir.glob("*.parquet")) if out_dir.is_dir() else []
    foreign = [name for name in foreign if name not in planned]
    if foreign:
        raise ValueError(f"output={str(out_dir / foreign[0])!r}: not part of this conversion "
                         f"({len(foreign)} such file(s); other rows_per_file or seed?): remove them or "
                         "choose another --output-dir")


def check_split(plan: SplitPlan, dst_dir: Path) -> dict[str, int]:
    """Verify ``dst_dir/<split>`` against ``plan``: every planned shard complete, rows per class equal to
    the source's images per class, class names in every file. Returns {"rows", "files"}; ValueError
    naming the first discrepancy."""
    out_dir = dst_dir / plan.name
    counts: Counter[int] = Counter()
    for shard in plan.shards:
        path = out_dir / shard.name
        if not shard_is_complete(path, shard):
            raise ValueError(f"output={str(path)!r}: missing or incomplete shard")
        parquet = pq.ParquetFile(path)
        names = json.loads((parquet.schema_arrow.metadata or {}).get(CLASS_NAMES_KEY, b"[]"))
        if tuple(names) != plan.class_names:
            raise ValueError(f"output={str(path)!r}: class names in the metadata differ from the source's")
        counts.update(parquet.read(columns=["label"]).column(0).to_numpy().tolist())
    for label, expected in enumerate(plan.class_counts):
        if counts.get(label, 0) != expected:
            raise ValueError(f"output={str(out_dir)!r}: class {plan.class_names[label]!r} (label {label}) "
                             f"has {counts.get(label, 0)} rows, the source has {expected} images")
    extra = set(counts) - set(range(len(plan.class_names)))
    if extra:
        raise ValueError(f"output={str(out_dir)!r}: labels {sorted(extra)[:5]} outside the class range")
    return {"rows": sum(counts.values()), "files": len(plan.shards)}


def class_names_of(path: str | Path) -> tuple[str, ...] | None:
    """Class names stored by the converter in a Parquet file's metadata (None when absent)."""
    raw = (pq.read_schema(path).metadata or {}).get(CLASS_NAMES_KEY)
    return tuple(json.loads(raw)) if raw else None
