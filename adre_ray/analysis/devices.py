"""The devices a result folder's rows were made on, in its manifest (key ``devices``).

Counts depend on the device beyond the noise: bf16 convolutions pick other algorithms on another GPU
model, TF32 and cuDNN autotuning change the last bits of logits, and a draw near a decision boundary then
lands in another class. Each certificate stays valid for the classifier that made it, but a folder whose
rows came from two kinds of device is no longer "the same counts whichever actor ran a shard". So
``record_devices`` stores each distinct ``adre_ray.device.device_facts`` of the actors, and refuses,
naming the differing fact, to add rows from other devices unless mixing was allowed (then every device
is listed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adre_ray import storage
from adre_ray.analysis.results import LEGACY_MANIFEST_NAME, MANIFEST_NAME, NOT_READ, read_manifest, side_file

DEVICES_KEY = "devices"


def _describe(facts: dict[str, Any]) -> str:
    return f"{facts.get('type')} {facts.get('model')!r}"


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    key = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), "?")
    return f"{key}={new.get(key)!r}, not {key}={old.get(key)!r}"


def record_devices(out_dir: str | Path, facts: Sequence[dict[str, Any]], *, allow_mixed: bool,
                   manifest: Any = NOT_READ) -> list[dict]:
    """Add the distinct ``facts`` of this run's workers to ``out_dir``'s manifest; return the full list.

    ``ValueError`` (nothing written) when the workers differ among themselves, or from the devices the
    folder already records, and ``allow_mixed`` is false. A manifest written before devices were recorded
    accepts any device (its earlier rows' devices are unknown). ``manifest``: the folder's, when read already.
    """
    manifest = read_manifest(out_dir) if manifest is NOT_READ else manifest
    if manifest is None:
        raise ValueError(f"output_dir={str(out_dir)!r}: no {MANIFEST_NAME} (ensure_manifest writes it first)")
    known: list[dict[str, Any]] = list(manifest.get(DEVICES_KEY) or [])
    distinct: list[dict[str, Any]] = []
    for item in facts:
        if dict(item) not in distinct:
            distinct.append(dict(item))
    if not allow_mixed:
        if len(distinct) > 1:
            raise ValueError(f"the certification actors run on different devices ({_describe(distinct[0])} "
                             f"and {_describe(distinct[1])}: {_difference(distinct[0], distinct[1])}); "
                             "their counts could differ; use one kind of node, or allow_mixed_devices=true")
        if known and distinct and distinct[0] not in known:
            raise ValueError(f"output_dir={str(out_dir)!r}: its rows were made on {_describe(known[0])}; "
                             f"these actors run on {_describe(distinct[0])} ("
                             f"{_difference(known[0], distinct[0])}), which can give other counts; use a new "
                             "output_dir, or allow_mixed_devices=true (--allow-mixed-devices) to mix them")
    added = [item for item in distinct if item not in known]
    if added:
        record = {**manifest, DEVICES_KEY: known + added}
        storage.write_bytes_atomic(side_file(out_dir, MANIFEST_NAME, LEGACY_MANIFEST_NAME),
                                   (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return known + added


__all__ = ["DEVICES_KEY", "record_devices"]
