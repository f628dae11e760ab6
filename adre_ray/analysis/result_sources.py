"""RESULT arguments of ``adre-ray analyze`` read and checked: result files and folders (local or at a URI),
published CERTIFY logs and MLflow runs' artifacts; rows of different runs or settings are never pooled."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from adre_ray import storage
from adre_ray.analysis.published_logs import is_certify_log, looks_like_text_table, read_certify_log
from adre_ray.analysis.results import (
    MANIFEST_FIELDS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    part_files,
    read_manifest,
    read_results,
)
from adre_ray.analysis.tables import setting_values
from adre_ray.smoothing.params import check_sigma
from adre_ray.tracking import DISABLED

RESULTS_ARTIFACT_PATH = "results"
"""Artifact folder under which the certification job logs its Parquet parts."""

_RUN_PREFIXES = ("mlflow:", "runs:/")


@dataclass(frozen=True)
class LoadedResult:
    """One RESULT argument, read: its rows, a default label and the MLflow run it came from (if any)."""

    spec: str
    table: pa.Table
    default_label: str
    run_id: str | None = None
    kind: str = "parquet"
    """"parquet" (certification results) or "certify_log" (a published CERTIFY log)."""
    sources: tuple[str, ...] = ()
    """The files or folders the rows were read from."""
    skipped: tuple[str, ...] = ()
    """MLflow artifact folders below the RESULT that were not read."""


def parse_run_spec(spec: str) -> tuple[str, str] | None:
    """``(run_id, artifact_path)`` for ``mlflow:<id>[/<path>]`` or ``runs:/<id>[/<path>]``, else None."""
    for prefix in _RUN_PREFIXES:
        if spec.startswith(prefix):
            rest = spec[len(prefix):].strip("/")
            run_id, _, artifact_path = rest.partition("/")
            if not run_id:
                raise ValueError(f"result={spec!r}: no run id after {prefix!r}")
            return run_id, artifact_path or RESULTS_ARTIFACT_PATH
    return None


MLFLOW_STORE_FOLDERS = ("mlartifacts", "mlruns")
"""Folders where MLflow keeps artifact copies (a SQLite store's ``mlartifacts/``, a file store's
``mlruns/``): a search for results below a folder never enters them, so a logged copy is not read as a
second result."""


@dataclass(frozen=True)
class ResultRead:
    """The rows of one RESULT, the folders or files they were read from, and the MLflow artifact folders
    that were left out."""

    table: pa.Table
    sources: tuple[str, ...]
    skipped: tuple[str, ...] = ()


HIDDEN = (".", "_")
"""Prefixes of the file and folder names that Parquet readers (and this search) skip."""


def find_result_sources(root: Path) -> tuple[list[Path], list[Path]]:
    """(result folders and loose Parquet files below ``root``, MLflow artifact folders not entered).

    A folder holding parts or a manifest is one result: what lies below it is not searched. Hidden
    folders and files (``.``, ``_``) are skipped, as Parquet readers do."""
    found: list[Path] = []
    skipped: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and (part_files(here) or read_manifest(here) is not None):
            found.append(here)
            dirnames[:] = []
            continue
        skipped += [here / d for d in sorted(dirnames) if d in MLFLOW_STORE_FOLDERS]
        dirnames[:] = sorted(d for d in dirnames
                             if d not in MLFLOW_STORE_FOLDERS and not d.startswith(HIDDEN))
        found += [here / f for f in sorted(filenames) if f.endswith(".parquet") and not f.startswith(HIDDEN)]
    return sorted(found), skipped


def read_result_path(path: str | Path, spec: str | None = None) -> ResultRead:
    """Every result row under ``path``: a Parquet file, a folder of parts, or a folder holding such
    folders or files (an MLflow download, a demo output folder), local or at a URI pyarrow opens
    (``s3://``, ``gs://``, ``file://``: a Parquet file or a folder of parts).

    Rows of different checkpoints or runs are never pooled: several result folders below ``path`` are
    read as one result only when they hold one run (same checkpoint and settings, no image twice),
    else ``ValueError`` names them and how to give them as separate RESULTs. MLflow's artifact copies
    (``mlartifacts/``, ``mlruns/``) are not read. ``ValueError`` naming ``spec`` (or the path) when
    nothing is there or no rows are found."""
    name = spec if spec is not None else str(path)
    if storage.is_uri(path):
        table = read_results(str(path))
        sources: list[str] = [str(path)]
        skipped: list[Path] = []
        manifests: list[dict] = []
    else:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"result={name!r}: no such file or directory")
        if path.is_file() or part_files(path) or read_manifest(path) is not None:
            found, skipped = [path], []
        else:
            found, skipped = find_result_sources(path)
        tables = [read_results(f) for f in found]
        manifests = []
        for folder in (f for f in found if f.is_dir()):
            if (manifest := read_manifest(folder)) is not None:
                check_manifest(manifest, str(folder / MANIFEST_NAME))
                manifests.append(manifest)
        check_one_run(name, found, tables)
        sources = [str(f) for f in found]
        table = pa.concat_tables(tables, promote_options="default") if tables else None
        if table is not None and len(tables) > 1:
            table = table.take(pc.sort_indices(table, sort_keys=[("idx", "ascending")]))
    if table is None or table.num_rows == 0:
        raise ValueError(f"result={name!r}: no result rows found "
                         "(expected the Parquet parts of a certification run)")
    check_rows(table, name)
    if manifests and all(_same_settings(m, manifests[0]) for m in manifests):
        check_rows_match_manifest(table, manifests[0], name)
    return ResultRead(table, tuple(sources), tuple(str(s) for s in skipped))


def _same_settings(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in MANIFEST_FIELDS)


def check_one_run(name: str, found: Sequence[Path], tables: Sequence[pa.Table]) -> None:
    """``ValueError`` when the result sources ``found`` under one RESULT are not one run: rows of several
    checkpoints, folders whose manifests differ, or an image in two of them. The message names the
    sources and says how to give them as separate RESULTs."""
    if len(found) < 2:
        return
    checkpoints = {str(f): sorted({c for c in t.column("checkpoint").to_pylist() if c is not None})
                   for f, t in zip(found, tables, strict=True)}
    manifests = [read_manifest(f) for f in found if f.is_dir()]
    how = ("give each as its own RESULT with a --label, e.g. adre-ray analyze "
           + " ".join([*map(str, found), *(f"--label NAME{i + 1}" for i in range(len(found)))]))
    if len({c for cs in checkpoints.values() for c in cs}) > 1:
        shown = "; ".join(f"{f}: {', '.join(cs) or 'no checkpoint recorded'}"
                          for f, cs in checkpoints.items())
        raise ValueError(f"result={name!r} holds results of different checkpoints ({shown}); they are not "
                         f"pooled into one row: {how}")
    present = [m for m in manifests if m is not None]
    if len(present) != len(manifests) or any(not _same_settings(m, present[0]) for m in present):
        raise ValueError(f"result={name!r} holds {len(found)} runs with different settings "
                         f"({', '.join(str(f) for f in found)}); they are not pooled into one row: {how}")
    seen: dict[int, str] = {}
    for source, table in zip(found, tables, strict=True):
        for idx in table.column("idx").to_pylist():
            if idx in seen and seen[idx] != str(source):
                raise ValueError(f"result={name!r}: idx={idx} is in both {seen[idx]} and {source} (a copy of "
                                 f"one run?); it is not counted twice: {how}")
            seen[idx] = str(source)


SETTING_COLUMNS = ("sigma", "n0", "n", "alpha", "tcertify_mode")
"""Row columns that must hold one value per result: averaging rows of two noise levels or sample sizes
into one curve would describe no run."""

_MANIFEST_KEYS = {"sigma": "sigma", "n0": "n0", "n": "n", "alpha": "alpha", "tcertify_mode": "mode"}


def check_manifest(manifest: dict, where: str) -> None:
    """``ValueError`` naming the file if ``run.json`` was written by a newer schema than this reader's."""
    version = manifest.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version={version} is newer than this adre-ray reads "
                         f"({SCHEMA_VERSION}); upgrade adre-ray to analyze it")


def check_rows(table: pa.Table, name: str) -> None:
    """``ValueError`` naming ``name`` when rows come from a newer schema, or mix settings (naming the
    column and its values)."""
    versions = sorted({v for v in table.column("schema_version").to_pylist() if v is not None})
    if versions and versions[-1] > SCHEMA_VERSION:
        raise ValueError(f"result={name!r}: rows with schema_version={versions[-1]}, newer than this "
                         f"adre-ray reads ({SCHEMA_VERSION}); upgrade adre-ray to analyze them")
    checkpoints = sorted({c for c in table.column("checkpoint").to_pylist() if c is not None})
    if len(checkpoints) > 1:
        raise ValueError(f"result={name!r}: rows of {len(checkpoints)} checkpoints "
                         f"({', '.join(checkpoints[:5])}) "
                         "are not pooled into one row; give each checkpoint's rows as its own RESULT "
                         "(with --label NAME for each)")
    for column in SETTING_COLUMNS:
        values = sorted(set(setting_values(table, column)), key=str)
        if len(values) > 1:
            shown = ", ".join(f"{column}={v!r}" for v in values[:5])
            raise ValueError(f"result={name!r}: rows mix {shown}; give each setting as its own result")


def check_rows_match_manifest(table: pa.Table, manifest: dict, name: str) -> None:
    """``ValueError`` when the rows' settings differ from the folder's ``run.json``."""
    for column, key in _MANIFEST_KEYS.items():
        if key not in manifest or manifest[key] is None:
            continue
        wanted = manifest[key]
        for value in set(setting_values(table, column, fallback=False)):
            same = value == wanted or (isinstance(value, float) and isinstance(wanted, (int, float))
                                       and math.isclose(value, wanted, rel_tol=1e-12))
            if not same:
                raise ValueError(f"result={name!r}: rows have {column}={value!r} but its manifest says "
                                 f"{key}={wanted!r}")


def _download_run(run_id: str, artifact_path: str, spec: str, tracking_uri: str,
                  dst: Path) -> tuple[Path, str]:
    """Download the run's artifacts at ``artifact_path`` into ``dst``; returns (local path, run name)."""
    if tracking_uri == DISABLED:
        raise ValueError(f"result={spec!r}: MLflow tracking is disabled (tracking_uri='none')")
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"result={spec!r}: no MLflow run {run_id!r} in {tracking_uri} "
                         f"({err.message})") from err
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(dst), tracking_uri=tracking_uri)
    except (MlflowException, OSError) as err:
        raise ValueError(f"result={spec!r}: cannot download artifacts {artifact_path!r} of run {run_id} "
                         f"({err})") from err
    return Path(local), run.info.run_name or run_id[:8]


def load_result(spec: str, *, tracking_uri: str, download_dir: Path) -> LoadedResult:
    """Read one RESULT argument (path or MLflow run); ``ValueError`` naming ``spec`` if it has no rows."""
    parsed = parse_run_spec(spec)
    if parsed is None:
        path = Path(spec)
        if is_certify_log(path) or (path.is_file() and looks_like_text_table(path)):
            return LoadedResult(spec, read_certify_log(path), path.stem or path.name, kind="certify_log",
                                sources=(str(path),))
        label = path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.name
        read = read_result_path(spec if storage.is_uri(spec) else path, spec)
        return LoadedResult(spec, read.table, label or str(path), sources=read.sources, skipped=read.skipped)
    run_id, artifact_path = parsed
    dst = download_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)
    dst.mkdir(parents=True, exist_ok=True)
    local, run_name = _download_run(run_id, artifact_path, spec, tracking_uri, dst)
    read = read_result_path(local, spec)
    return LoadedResult(spec, read.table, run_name, run_id, sources=(spec,), skipped=read.skipped)


def apply_sigmas(results: Sequence[LoadedResult], sigmas: Sequence[float] | None) -> list[LoadedResult]:
    """``results`` with the published logs' ``sigma`` column set from ``sigmas`` (one value for all, or one
    per RESULT). A Parquet RESULT keeps its recorded sigma; a given value that differs is an error."""
    if not sigmas:
        return list(results)
    values = list(sigmas) * len(results) if len(sigmas) == 1 else list(sigmas)
    out = []
    for result, sigma in zip(results, values, strict=True):
        check_sigma(sigma, "--sigma")
        table = result.table
        if result.kind == "certify_log":
            column = pa.array([float(sigma)] * table.num_rows, pa.float64())
            table = table.set_column(table.schema.get_field_index("sigma"), "sigma", column)
            result = dataclasses.replace(result, table=table)
        else:
            recorded = {v for v in table.column("sigma").to_pylist() if v is not None}
            if recorded and recorded != {float(sigma)}:
                raise ValueError(f"--sigma={sigma:g} for result={result.spec!r}: its rows were certified "
                                 f"at sigma={'/'.join(f'{v:g}' for v in sorted(recorded))}")
        out.append(result)
    return out
