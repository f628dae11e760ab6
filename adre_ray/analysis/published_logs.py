"""Certification logs of the original randomized-smoothing code, read as CERTIFY result tables.

The original ``certify.py`` (and SmoothAdv, Consistency, MACER, SmoothMix) writes one tab-separated line
per image under the header ``idx label predict radius correct time``: ``predict`` is CERTIFY's class
(-1 = abstain), ``radius`` its certified radius (3 significant digits), ``correct`` 1 when
``predict == label``, ``time`` the seconds taken, as ``15.4`` or as ``str(datetime.timedelta)``
(``0:02:35.760262``, ``1 day, 0:00:01.5``). Columns are found by their header names, in any order;
other columns (Levine et al.'s ``raw_count p_A_bar``) are ignored. The rows become ``RESULT_SCHEMA``
rows with the CERTIFY columns filled (``certify_predict``, ``correct``, ``radius_certify``, ``time_s``)
and the columns the log does not have (T-CERTIFY, PREDICT, counts, n, alpha) null; ``sigma`` is the
caller's, if given.

Nothing in a log is trusted that can be checked: ``correct`` is derived from ``predict == label`` (an
abstention is never correct) and a row whose ``correct`` says otherwise is refused, as is a radius that
is negative, not finite, or not 0 on an abstention. The file is read line by line into typed arrays, so
a log of a million lines takes tens of megabytes, not gigabytes.
"""

from __future__ import annotations

import math
import re
from array import array
from pathlib import Path

import numpy as np
import pyarrow as pa

from adre_ray.analysis.results import upgrade_table

LOG_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
"""Columns a published certification log must have (the original code's order; any order is read)."""

_TIMEDELTA = re.compile(r"^(?:(?P<days>-?\d+) days?, )?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d+)?)$")


def _header(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def missing_columns(names: list[str]) -> list[str]:
    """The columns of ``LOG_HEADER`` that a header line's ``names`` lacks."""
    present = {n.strip() for n in names}
    return [c for c in LOG_HEADER if c not in present]


def looks_like_text_table(path: str | Path) -> bool:
    """Whether ``path`` is a file that is not Parquet and whose first line is text of several words (a
    log whose header may be wrong: ``read_certify_log`` then says what the header should be)."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(4096)
        return not first.startswith(b"PAR1") and len(first.decode("utf-8").split()) > 1
    except (OSError, UnicodeDecodeError):
        return False


def is_certify_log(path: str | Path) -> bool:
    """Whether ``path`` is a file whose first line is a published log header (tabs or spaces): every
    column of ``LOG_HEADER``, in any order, possibly with others."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return not missing_columns(first.split())


def parse_seconds(text: str) -> float:
    """Seconds of ``15.4`` or of a ``datetime.timedelta`` string (``0:02:35.760262``, ``2 days, 1:00:00``)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _TIMEDELTA.match(text)
    if match is None:
        raise ValueError(f"time={text!r}: expected seconds (15.4) or H:MM:SS[.ffffff]")
    days = int(match["days"] or 0)
    return days * 86400.0 + int(match["h"]) * 3600.0 + int(match["m"]) * 60.0 + float(match["s"])


def read_certify_log(path: str | Path, sigma: float | None = None) -> pa.Table:
    """The log at ``path`` as a ``RESULT_SCHEMA`` table (CERTIFY columns only), sorted by idx.

    ``ValueError`` naming the file and line for a header without the ``LOG_HEADER`` columns, a line with
    another field count, a value that is not a number, ``correct`` other than 0/1 or contradicting
    ``predict == label``, a negative or non-finite radius, a positive radius on an abstention, or a
    repeated idx.
    """
    path = Path(path)
    name = str(path)
    ints = {key: array("q") for key in ("idx", "label", "certify_predict", "line")}
    floats = {key: array("d") for key in ("radius_certify", "time_s")}
    with open(path, encoding="utf-8") as handle:
        header = _header(handle.readline().rstrip("\n"))
        missing = missing_columns(header)
        if missing:
            raise ValueError(f"log {name!r}: first line must be a header naming the columns "
                             f"{' '.join(LOG_HEADER)!r} (any order, other columns allowed); missing "
                             f"{', '.join(missing)} in {' '.join(header)!r}")
        where = {column: [h.strip() for h in header].index(column) for column in LOG_HEADER}
        for number, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            fields = _header(line.rstrip("\n"))
            if len(fields) != len(header):
                raise ValueError(f"log {name!r} line {number}: {len(fields)} fields, expected "
                                 f"{len(header)} ({' '.join(header)})")
            values = _parse_line(fields, where, f"log {name!r} line {number}")
            for key, value in zip(("idx", "label", "certify_predict"), values[:3], strict=True):
                ints[key].append(value)
            ints["line"].append(number)
            floats["radius_certify"].append(values[3])
            floats["time_s"].append(values[4])
    if not ints["idx"]:
        raise ValueError(f"log {name!r}: no rows after the header")
    columns = {key: np.frombuffer(values, dtype=np.int64) for key, values in ints.items()}
    columns.update({key: np.frombuffer(values, dtype=np.float64) for key, values in floats.items()})
    _check_unique(columns["idx"], columns.pop("line"), name)
    rows = len(columns["idx"])
    table = pa.table({
        **{key: pa.array(values) for key, values in columns.items()},
        "correct": pa.array(columns["certify_predict"] == columns["label"]),
        "sigma": pa.nulls(rows, pa.float64()) if sigma is None else pa.array(np.full(rows, float(sigma))),
        "checkpoint": pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([name])),
        "schema_version": pa.nulls(rows, pa.int64()),  # not written by adre-ray
    })
    table = upgrade_table(table)
    return table if bool(np.all(np.diff(columns["idx"]) > 0)) else table.sort_by("idx")


def _parse_line(fields: list[str], where: dict[str, int], place: str) -> tuple[int, int, int, float, float]:
    """(idx, label, predict, radius, seconds) of one log line, checked; ``ValueError`` naming ``place``."""
    texts = {column: fields[position].strip() for column, position in where.items()}
    try:
        idx, label, predict = int(texts["idx"]), int(texts["label"]), int(texts["predict"])
        radius = float(texts["radius"])
        correct = int(texts["correct"])
        seconds = parse_seconds(texts["time"])
    except ValueError as err:
        raise ValueError(f"{place}: {err}") from None
    if correct not in (0, 1):
        raise ValueError(f"{place}: correct={texts['correct']!r} must be 0 or 1")
    if bool(correct) != (predict == label):
        raise ValueError(f"{place}: correct={correct} contradicts predict={predict}, label={label} "
                         "(correct is 1 exactly when predict == label; predict -1 is an abstention, never "
                         "correct)")
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"{place}: radius={texts['radius']!r} must be a finite number >= 0")
    if predict == -1 and radius != 0:
        raise ValueError(f"{place}: radius={texts['radius']!r} on an abstention (predict -1) must be 0")
    return idx, label, predict, radius, seconds


def _check_unique(idx: np.ndarray, lines: np.ndarray, name: str) -> None:
    order = np.argsort(idx, kind="stable")
    repeated = np.flatnonzero(idx[order][1:] == idx[order][:-1])
    if repeated.size:
        first = order[repeated + 1]
        position = int(first[np.argmin(lines[first])])
        raise ValueError(f"log {name!r} line {int(lines[position])}: idx={int(idx[position])} appears twice")


__all__ = ["LOG_HEADER", "is_certify_log", "looks_like_text_table", "missing_columns", "parse_seconds",
           "read_certify_log"]
