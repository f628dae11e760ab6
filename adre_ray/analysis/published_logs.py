"""Certification logs of the original randomized-smoothing code, read as CERTIFY result tables.

The original ``certify.py`` (and SmoothAdv, Consistency, MACER, SmoothMix) writes one tab-separated line
per image under the header ``idx label predict radius correct time`` (forks add columns, e.g. Levine et
al.'s ``idx label predict radius raw_count p_A_bar correct time``: extra columns are read past):
``predict`` is CERTIFY's class (-1 = abstain), ``radius`` its certified radius (3 significant digits),
``correct`` 1 when ``predict == label``, ``time`` the seconds taken, as ``15.4`` or as
``str(datetime.timedelta)`` (``0:02:35.760262``, ``1 day, 0:00:01.5``). The rows become
``RESULT_SCHEMA`` rows with the CERTIFY columns filled (``certify_predict``, ``correct``,
``radius_certify``, ``time_s``) and the columns the log does not have (T-CERTIFY, PREDICT, counts, n,
alpha) null; ``sigma`` is the caller's, if given.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from adre_ray.analysis.results import upgrade_table

LOG_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
"""Columns of a published certification log, in order."""

_TIMEDELTA = re.compile(r"^(?:(?P<days>-?\d+) days?, )?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d+)?)$")


def is_certify_log(path: str | Path) -> bool:
    """Whether ``path`` is a file whose first line is the published log header (tabs or spaces)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return _log_columns(first) is not None


def _log_columns(header: str) -> dict[str, int] | None:
    """Position of each ``LOG_HEADER`` column in ``header`` (its six names, in this order, possibly with
    extra columns between or after them, e.g. ``raw_count p_A_bar``), or None if it is no log header."""
    names = header.split()
    if len(set(names)) != len(names) or not set(LOG_HEADER) <= set(names):
        return None
    positions = {name: names.index(name) for name in LOG_HEADER}
    if [positions[name] for name in LOG_HEADER] != sorted(positions.values()):
        return None
    return positions


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

    ``ValueError`` naming the file and line for a wrong header, a line with another field count, a
    value that is not a number, ``correct`` other than 0/1, a negative radius or a repeated idx.
    """
    path = Path(path)
    name = str(path)
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    positions = _log_columns(lines[0]) if lines else None
    if positions is None:
        raise ValueError(f"log {name!r}: first line must be the header {' '.join(LOG_HEADER)!r} (extra "
                         "columns such as raw_count may come between or after)")
    width = len(lines[0].split())
    columns: dict[str, list] = {k: [] for k in ("idx", "label", "certify_predict", "radius_certify",
                                                "correct", "time_s")}
    seen: set[int] = set()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) != width:
            raise ValueError(f"log {name!r} line {number}: {len(fields)} fields, expected {width} "
                             f"({lines[0].strip()})")
        idx_text, label_text, predict_text, radius_text, correct_text, time_text = (
            fields[positions[column]] for column in LOG_HEADER)
        try:
            idx, label, predict = int(idx_text), int(label_text), int(predict_text)
            radius = float(radius_text)
            correct = int(correct_text)
            seconds = parse_seconds(time_text)
        except ValueError as err:
            raise ValueError(f"log {name!r} line {number}: {err}") from None
        if correct not in (0, 1):
            raise ValueError(f"log {name!r} line {number}: correct={correct_text!r} must be 0 or 1")
        if not radius >= 0:
            raise ValueError(f"log {name!r} line {number}: radius={radius_text!r} must be a number >= 0")
        if idx in seen:
            raise ValueError(f"log {name!r} line {number}: idx={idx} appears twice")
        seen.add(idx)
        columns["idx"].append(idx)
        columns["label"].append(label)
        columns["certify_predict"].append(predict)
        columns["radius_certify"].append(radius)
        columns["correct"].append(bool(correct))
        columns["time_s"].append(seconds)
    if not seen:
        raise ValueError(f"log {name!r}: no rows after the header")
    rows = len(columns["idx"])
    table = pa.table({
        **columns,
        "sigma": pa.array([sigma] * rows, pa.float64()),
        "checkpoint": pa.array([name] * rows, pa.string()),
        "schema_version": pa.nulls(rows, pa.int64()),  # not written by adre-ray
    })
    table = upgrade_table(table)
    return table.sort_by("idx")


__all__ = ["LOG_HEADER", "is_certify_log", "parse_seconds", "read_certify_log"]
