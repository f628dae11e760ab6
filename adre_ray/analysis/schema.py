"""The result rows' Parquet schema (``RESULT_SCHEMA``, version ``SCHEMA_VERSION``) and how rows written by
older versions are read (``upgrade_table``: missing columns derived where the stored ones determine them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 4
"""Version of ``RESULT_SCHEMA``. 1: the ARCHITECTURE.md column list; 2: per-method classes, pilot counts;
3: evaluation shortcuts (``samples_used``, ``shortcut``), the runner-up bound (``pb_bound``),
``train_sigma`` and ``noise_scheme`` (the sampler's noise stream version,
adre_ray.smoothing.sampler.NOISE_SCHEME); 4: ``precision`` (fp32 | bf16: the base classifier's numeric
precision; null in older files, whose precision was not recorded) and sequential certification
(``certify_level``, ``target_radius``, ``decision``; adre_ray.smoothing.sequential)."""

RESULT_SCHEMA = pa.schema(
    [
        pa.field("idx", pa.int64(), nullable=False),       # index of the image in its split
        pa.field("label", pa.int64()),                      # true class
        pa.field("predict", pa.int64()),                    # PREDICT's class on the main counts, -1 abstain
        pa.field("correct", pa.bool_()),                    # CERTIFY's class == label (False on abstain)
        pa.field("correct_tcertify", pa.bool_()),           # T-CERTIFY's class == label (False on abstain)
        pa.field("certify_predict", pa.int64()),            # CERTIFY's class, -1 abstain
        pa.field("tcertify_predict", pa.int64()),           # T-CERTIFY's class, -1 abstain
        pa.field("radius_certify", pa.float64()),           # sigma * Phi^-1(pA_lower), 0 on abstain
        pa.field("radius_tcertify", pa.float64()),          # T-CERTIFY radius, 0 on abstain
        pa.field("tcertify_mode", pa.string()),             # paper | bonferroni | pilot
        pa.field("pA_lower", pa.float64()),                 # T-CERTIFY's bounds at its chosen alpha'
        pa.field("pB_upper", pa.float64()),
        pa.field("alpha_prime", pa.float64()),
        pa.field("pA_lower_certify", pa.float64()),         # CERTIFY's Clopper-Pearson bound at alpha
        pa.field("counts", pa.list_(pa.int64())),           # main-stream counts of every class (sum n)
        pa.field("pilot_counts", pa.list_(pa.int64())),     # pilot-stream counts of every class (sum n0)
        pa.field("n0", pa.int64()),
        pa.field("n", pa.int64()),
        pa.field("alpha", pa.float64()),
        pa.field("sigma", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("noise_scheme", pa.int64()),               # sampler noise stream version (1 before v3)
        pa.field("time_s", pa.float64()),                   # wall time from first shard sent to last summed
        pa.field("checkpoint", pa.string()),                # model checkpoint path
        pa.field("train_run_id", pa.string()),              # MLflow run id of the training run, if known
        pa.field("train_sigma", pa.float64()),              # sigma the model was trained with, if known (v3)
        pa.field("schema_version", pa.int64()),             # version of the writer of this row
        pa.field("pb_bound", pa.string()),                  # T-CERTIFY runner-up bound: sum (eq. 14) | max
        pa.field("samples_used", pa.int64()),               # pilot + main draws actually made
        pa.field("shortcut", pa.string()),                  # none | skipped_misclassified | early_abstain
                                                            # | iss | decided | target_radius
        pa.field("precision", pa.string()),                 # fp32 | bf16: the base classifier's (v4)
        pa.field("certify_level", pa.float64()),            # level of this row's CERTIFY / T-CERTIFY
                                                            # (alpha, or a sequential look's share) (v4)
        pa.field("target_radius", pa.float64()),            # --target-radius r, null without (v4)
        pa.field("decision", pa.string()),                  # certified | not_certified | abstain at r (v4)
    ],
    metadata={b"adre_ray.schema_version": str(SCHEMA_VERSION).encode()},
)

_OPTIONAL_ROW_KEYS = frozenset({"schema_version", "pb_bound", "samples_used", "shortcut", "train_sigma",
                                "noise_scheme", "precision", "certify_level", "target_radius", "decision"})
"""Row keys ``write_part`` fills when absent: the writer's version, pb_bound null, samples_used = n0 + n,
shortcut "none" (a row made without shortcuts), train_sigma, noise_scheme and precision null,
certify_level = alpha, target_radius and decision null."""


def _derive_correct(t: pa.Table) -> pa.Array | None:
    if "certify_predict" in t.schema.names and "label" in t.schema.names:
        return pc.fill_null(pc.equal(t.column("certify_predict"), t.column("label")), False)
    return None


def _derive_correct_tcertify(t: pa.Table) -> pa.Array | None:
    if "tcertify_predict" in t.schema.names and "label" in t.schema.names:
        return pc.fill_null(pc.equal(t.column("tcertify_predict"), t.column("label")), False)
    return None


def _derive_sum(source: str) -> Any:
    def derive(t: pa.Table) -> pa.Array | None:
        if source not in t.schema.names:
            return None
        column = t.column(source)
        if column.null_count == len(column):  # e.g. a published log: no counts, so no n
            return pa.nulls(len(column), pa.int64())
        values = column.to_pylist()
        return pa.array([None if v is None else int(sum(v)) for v in values], pa.int64())
    return derive


def _derive_samples_used(t: pa.Table) -> pa.Array | None:
    if "n0" not in t.schema.names or "n" not in t.schema.names:
        return None
    return pc.add(t.column("n0").cast(pa.int64()), t.column("n").cast(pa.int64()))


def _constant(value: str) -> Any:
    def derive(t: pa.Table) -> pa.Array:
        codes = pa.array(np.zeros(t.num_rows, np.int32))  # no Python object per row
        return pa.DictionaryArray.from_arrays(codes, pa.array([value], pa.string())).cast(pa.string())
    return derive


_DERIVED = {
    "correct": _derive_correct,                    # certify class == label
    "correct_tcertify": _derive_correct_tcertify,  # tcertify class == label
    "n": _derive_sum("counts"),                    # the main counts sum to n
    "n0": _derive_sum("pilot_counts"),             # the pilot counts sum to n0
    "pb_bound": _constant("sum"),                  # before version 3 T-CERTIFY always used eq. 14
    "samples_used": _derive_samples_used,          # before version 3 every image made n0 + n draws
    "shortcut": _constant("none"),                 # ... and took no shortcut
    "certify_level": lambda t: t.column("alpha") if "alpha" in t.schema.names else None,  # before v4: alpha
}


def upgrade_table(table: pa.Table) -> pa.Table:
    """``table`` with every ``RESULT_SCHEMA`` column (cast to its type), derived or null where missing.

    Columns the schema does not know stay, after the schema's. ``ValueError`` if a present column cannot
    be cast to its schema type or ``idx`` is missing.
    """
    if "idx" not in table.schema.names:
        raise ValueError("no idx column")
    present = dict(zip(table.schema.names, table.columns, strict=True))
    nulls: dict[pa.DataType, pa.Array] = {}  # one all-null array per type, shared by its columns
    for field in RESULT_SCHEMA:
        if field.name in present:
            continue
        derive = _DERIVED.get(field.name)
        value = derive(table) if derive else None
        if field.name == "noise_scheme" and value is None:  # files before v3: noise scheme 1
            value = pa.array(np.ones(table.num_rows, np.int64))
        if field.name == "schema_version" and value is None:
            meta = table.schema.metadata or {}
            version = meta.get(b"adre_ray.schema_version")
            value = pa.array(np.full(table.num_rows, int(version) if version else 1, np.int64))
        if value is None:
            value = nulls.setdefault(field.type, pa.nulls(table.num_rows, field.type))
        present[field.name] = value
        table = table.append_column(field.name, value)
    columns, fields = [], []
    for field in RESULT_SCHEMA:
        try:
            columns.append(present[field.name].cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise ValueError(f"column {field.name}: cannot read as {field.type} ({err})") from err
        fields.append(field)
    for name, column in present.items():
        if name not in RESULT_SCHEMA.names:
            columns.append(column)
            fields.append(pa.field(name, column.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=RESULT_SCHEMA.metadata))
