"""Certification results as Parquet: one row per certified image, written in small atomic parts.

Layout of an output folder::

    out_dir/_run.json                        the run manifest (settings every row was made with)
    out_dir/part-000000020-<uuid>.parquet    finished images, named by the part's first idx

Side files start with ``_`` or ``.`` (``_run.json``, ``_mlflow_run.json``, ``.adre_ray.lock``), names that
Parquet readers skip, so the folder is a Parquet dataset: ``pyarrow.dataset.dataset(out_dir)`` and
``pandas.read_parquet(out_dir)`` read the rows. Folders written before (``run.json``) stay readable and
resumable: the old name is read when the new one is absent.

Guarantees:

- ``write_part`` is atomic: in a local folder the part is written to a hidden temporary file in
  ``out_dir``, flushed to disk and moved into place with ``os.replace``; on object storage (``s3://``,
  ``gs://``; ``out_dir`` may be any URI pyarrow opens, see ``adre_ray.storage``) the finished bytes are
  sent in one upload under the part's unique final name, and an object appears only once its upload
  (a PUT or a multipart upload) is complete. A reader sees a whole
  part or none of it, and a run killed mid-write leaves at most a ``.tmp`` file that readers ignore.
  Resume lists the folder's parts (a prefix listing on object storage, which is strongly consistent on
  S3 and GCS), so every part written before a crash is found.
- ``read_results`` never silently drops data: a part that cannot be read raises ``ValueError`` naming
  the file (``strict=False`` skips it with a ``RuntimeWarning`` instead). Files written by older
  versions of this schema are read: missing columns become nulls, or are derived where the stored
  columns determine them (``adre_ray.analysis.schema.upgrade_table``); columns this version does not
  know are kept.
- ``ensure_manifest`` refuses to put rows made with different settings into one folder: a re-run with
  different settings raises ``ValueError`` naming the differing field; the same settings resume.
"""

from __future__ import annotations

import json
import math
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from adre_ray import storage
from adre_ray.analysis.schema import (  # noqa: F401  (re-exported: the schema is part of this API)
    _OPTIONAL_ROW_KEYS,
    RESULT_SCHEMA,
    SCHEMA_VERSION,
    upgrade_table,
)

MANIFEST_NAME = "_run.json"
LEGACY_MANIFEST_NAME = "run.json"
"""The manifest's name in folders written before it started with ``_`` (read, never written anew)."""
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

MANIFEST_FIELDS = ("checkpoint", "dataset", "split", "sigma", "n0", "n", "alpha", "seed", "mode", "grid",
                   "shard_size", "pb_bound", "skip_misclassified", "early_abstain", "early_abstain_delta",
                   "early_abstain_wave", "n_policy", "iss_max_radius_loss", "noise_scheme", "precision",
                   "early_abstain_rule", "stop_when_decided", "decide_grid", "decide_delta", "target_radius")
"""Settings that determine every row's values: a folder holds rows of one setting only."""

MANIFEST_DEFAULTS: dict[str, Any] = {
    "pb_bound": "sum", "skip_misclassified": False, "early_abstain": False, "early_abstain_delta": 1e-4,
    "early_abstain_wave": 1, "n_policy": "fixed", "iss_max_radius_loss": 0.05, "noise_scheme": 1,
    "precision": None,
    "early_abstain_rule": "cp", "stop_when_decided": False, "decide_grid": None, "decide_delta": 1e-4,
    "target_radius": None,
}
"""What a manifest written before a field existed means by its absence (the behaviour of that version)."""

# ----------------------------------------------------------------------------------------------- writing


def write_part(out_dir: str | Path, rows: Sequence[Mapping[str, Any]] | pa.Table) -> Path | str:
    """Atomically write ``rows`` (dicts with every ``RESULT_SCHEMA`` column) as one new Parquet part.

    The file is ``out_dir/part-<first idx, 9 digits>-<uuid>.parquet``; it appears complete or not at all.
    Returns its path (a ``Path`` in a local folder, the URI on object storage).
    Raises ``ValueError`` for no rows, a missing or unknown column, or a null ``idx``.
    """
    table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
    if table.num_rows == 0:
        raise ValueError("rows=[]: a part must hold at least one row")
    if table.schema.names != RESULT_SCHEMA.names:
        raise ValueError(f"rows: columns {table.schema.names} differ from RESULT_SCHEMA "
                         f"{RESULT_SCHEMA.names}")
    table = table.cast(RESULT_SCHEMA)
    if table.column("idx").null_count:
        raise ValueError("rows: idx must not be null")
    first = int(pc.min(table.column("idx")).as_py())
    token = uuid.uuid4().hex
    name = f"{PART_PREFIX}{first:09d}-{token}{PART_SUFFIX}"
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)  # complete in memory before anything is written
    target = storage.join(out_dir, name)
    storage.write_bytes_atomic(target, buffer.getvalue().to_pybytes())  # temp + rename, or one upload
    return target if storage.is_uri(out_dir) else Path(out_dir) / name


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """``rows`` as a ``RESULT_SCHEMA`` table, optional columns filled (``ValueError`` naming a bad row)."""
    names = set(RESULT_SCHEMA.names)
    required = names - _OPTIONAL_ROW_KEYS
    clean = []
    for position, row in enumerate(rows):
        keys = set(row)
        missing, unknown = sorted(required - keys), sorted(keys - names)
        if missing:
            raise ValueError(f"rows[{position}]: missing column(s) {', '.join(missing)}")
        if unknown:
            raise ValueError(f"rows[{position}]: unknown column(s) {', '.join(unknown)}")
        row = {key: _plain(value) for key, value in row.items()}
        row.setdefault("schema_version", SCHEMA_VERSION)
        row.setdefault("pb_bound", None)
        if "samples_used" not in row:
            n0, n = row.get("n0"), row.get("n")
            row["samples_used"] = None if n0 is None or n is None else int(n0) + int(n)
        row.setdefault("shortcut", "none")
        row.setdefault("certify_level", row.get("alpha"))
        clean.append(row)
    try:
        return pa.Table.from_pylist(clean, schema=RESULT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"rows: values do not fit RESULT_SCHEMA ({err})") from err


def _plain(value: Any) -> Any:
    """numpy scalars / arrays -> Python values that pyarrow converts without surprises."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value



# ----------------------------------------------------------------------------------------------- reading


def part_files(out_dir: str | Path) -> list[Path] | list[str]:
    """The finished parts in ``out_dir`` (temporary files and the manifest excluded), sorted by name
    (URIs when ``out_dir`` is one)."""
    if storage.is_uri(out_dir):
        return [storage.join(out_dir, name) for name in storage.list_files(out_dir)
                if name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)]
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir()
                  if p.is_file() and p.name.startswith(PART_PREFIX) and p.name.endswith(PART_SUFFIX))


def _result_files(path: str | Path) -> list[Path] | list[str]:
    if storage.is_uri(path):
        kind = storage.file_type(path)
        if kind == pafs.FileType.File:
            return [str(path)]
        if kind == pafs.FileType.Directory:
            return part_files(path)
        raise ValueError(f"path={str(path)!r}: no such file or directory")
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return part_files(path)
    raise ValueError(f"path={str(path)!r}: no such file or directory")


def _read_file(path: Path | str, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        fs, inner = storage.resolve(path)
        if columns is not None:
            available = pq.read_schema(inner, filesystem=fs).names
            columns = [c for c in columns if c in available]
        return pq.read_table(inner, columns=columns, filesystem=fs)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"result part {str(path)!r} is corrupt or unreadable: {err}") from err


def read_results(path: str | Path, *, strict: bool = True) -> pa.Table:
    """All rows of a result file or folder as one table with ``RESULT_SCHEMA``'s columns first, sorted by idx.

    Older files: missing columns are derived when the stored ones determine them, else null; columns
    unknown to this version are kept after the schema's columns (null in parts that lack them).
    ``strict=True`` (default): a corrupt part or an idx present twice raises ``ValueError`` naming the
    file(s). ``strict=False``: a corrupt part is skipped with a ``RuntimeWarning`` naming it, and of
    duplicated idx the row from the first part (by name) is kept, with a warning.
    An empty folder gives an empty table.
    """
    parts = read_parts(_result_files(path), strict=strict)
    return merge_results(list(parts.values()), list(parts), strict=strict)


def read_parts(files: Sequence[Path | str], *, strict: bool = True) -> dict[Path | str, pa.Table]:
    """Each of ``files`` read and upgraded (``upgrade_table``), by file; a corrupt one raises ``ValueError``
    naming it (``strict=False``: skipped with a ``RuntimeWarning``)."""
    parts: dict[Path | str, pa.Table] = {}
    for file in files:
        try:
            table = _read_file(file)
        except ValueError as err:
            if strict:
                raise
            warnings.warn(f"skipping {err}", RuntimeWarning, stacklevel=3)
            continue
        try:
            parts[file] = upgrade_table(table)
        except ValueError as err:
            if strict:
                raise ValueError(f"result part {str(file)!r}: {err}") from err
            warnings.warn(f"skipping result part {str(file)!r}: {err}", RuntimeWarning, stacklevel=3)
    return parts


def merge_results(tables: Sequence[pa.Table], sources: Sequence[Path | str], *, strict: bool = True
                  ) -> pa.Table:
    """``tables`` (read from ``sources``, named in errors) as one table with ``RESULT_SCHEMA``'s columns
    first and other columns after, sorted by idx; an idx present twice as ``read_results`` says."""
    tables, sources = list(tables), list(sources)
    if not tables:
        return RESULT_SCHEMA.empty_table()
    extra: dict[str, pa.DataType] = {}
    for table in tables:
        for field in table.schema:
            if field.name not in RESULT_SCHEMA.names and field.name not in extra:
                extra[field.name] = field.type
    full_schema = pa.schema(list(RESULT_SCHEMA) + [pa.field(k, t) for k, t in extra.items()],
                            metadata=RESULT_SCHEMA.metadata)
    aligned = []
    for table in tables:
        columns = [table.column(f.name).cast(f.type) if f.name in table.schema.names
                   else pa.nulls(table.num_rows, f.type) for f in full_schema]
        aligned.append(pa.Table.from_arrays(columns, schema=full_schema))
    merged = pa.concat_tables(aligned)
    merged = _check_duplicates(merged, aligned, sources, strict)
    order = pc.sort_indices(merged, sort_keys=[("idx", "ascending")])
    return merged.take(order)


def _check_duplicates(
    merged: pa.Table, tables: list[pa.Table], sources: list[Path | str], strict: bool
) -> pa.Table:
    idx = merged.column("idx").to_numpy()
    unique, first_pos, counts = np.unique(idx, return_index=True, return_counts=True)
    if len(unique) == len(idx):
        return merged
    dup = int(unique[counts > 1][0])
    owners = [str(src) for src, t in zip(sources, tables, strict=True)
              if dup in set(t.column("idx").to_pylist())]
    message = f"idx={dup} appears {int(counts[counts > 1][0])} times, in {', '.join(owners)}"
    if strict:
        raise ValueError(message)
    warnings.warn(f"{message}; keeping the first", RuntimeWarning, stacklevel=3)
    return merged.take(pa.array(np.sort(first_pos)))


# Columns a writer of an older version may lack, and how this version fills them in. Each function gets
# the table (already holding every earlier column of RESULT_SCHEMA) and returns the column or None.
def completed_indices(out_dir: str | Path) -> set[int]:
    """The idx of every image already in ``out_dir``'s parts; a corrupt part raises ``ValueError``."""
    done: set[int] = set()
    for file in part_files(out_dir):
        table = _read_file(file, columns=["idx"])
        if "idx" not in table.schema.names:
            raise ValueError(f"result part {str(file)!r} is corrupt or unreadable: no idx column")
        done.update(int(i) for i in table.column("idx").to_pylist())
    return done


# ----------------------------------------------------------------------------------------------- manifest


def _normalise(value: Any) -> Any:
    """JSON-stable form: tuples -> lists, numpy scalars -> Python, ints that are floats stay floats."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return _plain(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def side_file(out_dir: str | Path, name: str, legacy_name: str) -> str:
    """``out_dir/name``, or ``out_dir/legacy_name`` when only that one exists (a folder of an older
    version)."""
    path = storage.join(out_dir, name)
    if storage.file_type(path) != pafs.FileType.File:
        legacy = storage.join(out_dir, legacy_name)
        if storage.file_type(legacy) == pafs.FileType.File:
            return legacy
    return path


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """``out_dir/_run.json`` (or an older folder's ``run.json``) as a dict, or None when absent.
    ``ValueError`` naming the file if unreadable."""
    path = storage.join(out_dir, MANIFEST_NAME)
    try:
        path = side_file(out_dir, MANIFEST_NAME, LEGACY_MANIFEST_NAME)
        if storage.file_type(path) != pafs.FileType.File:
            return None
        data = json.loads(storage.read_bytes(path))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"manifest {str(path)!r} is corrupt or unreadable: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"manifest {str(path)!r}: top level must be an object")
    return data


NOT_READ: Any = object()
"""Default of the ``existing`` / ``manifest`` arguments: read the folder's manifest now. A caller that has
read it already passes the dict (or None: no manifest), so one run reads it once."""


def manifest_record(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What ``ensure_manifest`` writes for a new run of ``settings``: defaults filled, JSON-stable values."""
    wanted = {k: _normalise(v) for k, v in {**MANIFEST_DEFAULTS, **settings}.items()}
    return {**wanted, "schema_version": SCHEMA_VERSION}


def ensure_manifest(out_dir: str | Path, settings: Mapping[str, Any], existing: Any = NOT_READ) -> bool:
    """Write ``_run.json`` for a new run, or check that a resumed run has the same settings.

    ``settings`` must hold every key of ``MANIFEST_FIELDS`` (other keys are stored, not compared); a key
    of ``MANIFEST_DEFAULTS`` left out of ``settings`` or absent from an older manifest takes its default.
    Returns True when an existing manifest matched (a resume), False when a new one was written.
    Raises ``ValueError`` as ``check_manifest_settings`` does.
    """
    if check_manifest_settings(out_dir, settings, existing):
        return True
    record = manifest_record(settings)
    storage.write_bytes_atomic(storage.join(out_dir, MANIFEST_NAME),
                               (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return False


def check_manifest_settings(out_dir: str | Path, settings: Mapping[str, Any], existing: Any = NOT_READ
                            ) -> bool:
    """Whether ``out_dir`` holds a manifest with these settings (True: a resume; False: a new run), writing
    nothing. Raises ``ValueError`` naming the first differing field, e.g.
    ``output_dir='out': sigma=0.5 differs from the run already there (sigma=0.25); use a new output_dir``.
    Parts without a manifest are refused too: their settings are unknown.
    """
    missing = [k for k in MANIFEST_FIELDS if k not in settings and k not in MANIFEST_DEFAULTS]
    if missing:
        raise ValueError(f"settings: missing manifest field(s) {', '.join(missing)}")
    wanted = {k: _normalise(v) for k, v in {**MANIFEST_DEFAULTS, **settings}.items()}
    existing = read_manifest(out_dir) if existing is NOT_READ else existing
    if existing is not None:
        existing = {**MANIFEST_DEFAULTS, **existing}
        for key in MANIFEST_FIELDS:
            old = existing.get(key, _normalise(MANIFEST_DEFAULTS[key]) if key in MANIFEST_DEFAULTS
                               else "<absent>")
            if key not in existing and key not in MANIFEST_DEFAULTS or not _same(old, wanted[key]):
                raise ValueError(f"output_dir={str(out_dir)!r}: {key}={wanted[key]!r} differs from the run "
                                 f"already there ({key}={old!r}); use a new output_dir")
        return True
    if part_files(out_dir):
        raise ValueError(f"output_dir={str(out_dir)!r}: holds result parts but no {MANIFEST_NAME}, so their "
                         "settings are unknown; use a new output_dir")
    return False


__all__ = [
    "LEGACY_MANIFEST_NAME", "MANIFEST_DEFAULTS", "MANIFEST_FIELDS", "MANIFEST_NAME", "NOT_READ",
    "RESULT_SCHEMA", "SCHEMA_VERSION", "check_manifest_settings", "completed_indices", "ensure_manifest",
    "manifest_record", "merge_results", "part_files", "read_manifest", "read_parts", "read_results",
    "rows_to_table", "side_file", "upgrade_table", "write_part",
]
