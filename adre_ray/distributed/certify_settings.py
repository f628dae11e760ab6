"""What a certification run is: its model's facts, its resolved settings, its manifest entries, its
shortcut rules, its output folder and its MLflow run (no actors, no scheduling).

The checkpoint file is read once per run (``model_facts``); the manifest is compared in ``check_resume``
(before Ray) and written by the driver (``ensure_manifest``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from adre_ray import storage
from adre_ray.analysis.results import NOT_READ, check_manifest_settings, read_manifest, side_file
from adre_ray.config.certify import CertifyConfig
from adre_ray.data import dataset_info
from adre_ray.data.datasets import arrays_dataset
from adre_ray.models.checkpoint import CHECKPOINT_FILENAME, read_checkpoint
from adre_ray.models.model_fn import model_fn_identity
from adre_ray.precision import resolve_precision
from adre_ray.smoothing import default_noise
from adre_ray.smoothing import noise_scheme as scheme_of_noise
from adre_ray.smoothing.certify import effective_pb_bound
from adre_ray.smoothing.shortcuts import (
    EarlyAbstain,
    InputSpecificSize,
    Sequential,
    Shortcut,
    SkipMisclassified,
)
from adre_ray.tracking.runs import DISABLED, resolve_tracking_uri


@dataclass(frozen=True)
class ModelFacts:
    """What the model's checkpoint records (each None when absent, all None for a model_fn): the training
    sigma, the training MLflow run id, the class count. Read once per run (``model_facts``)."""

    sigma: float | None = None
    run_id: str | None = None
    num_classes: int | None = None


def checkpoint_facts(checkpoint: str, num_classes: int | None) -> ModelFacts:
    """The ``ModelFacts`` of a checkpoint file (one read; no model is built). ``ValueError`` when it records
    another class count than ``num_classes`` (the dataset's, when known).

    sigma is the shallowest ``sigma`` (or ``<section>.sigma``) key in ``extra`` and its nested dicts
    (e.g. ``extra["sigma"]`` or ``extra["config"]["loss"]["sigma"]``); the run id is
    ``extra["mlflow_run_id"]``.
    """
    record = read_checkpoint(checkpoint)
    if num_classes is not None and record["num_classes"] is not None and record["num_classes"] != num_classes:
        raise ValueError(f"checkpoint={checkpoint!r}: num_classes={record['num_classes']} but the dataset "
                         f"has {num_classes} classes")
    extra = record.get("extra") or {}
    run_id = extra.get("mlflow_run_id")
    sigma = None
    level: list[dict[str, Any]] = [extra]
    while level and sigma is None:
        for section in level:
            for key, value in section.items():
                if (key == "sigma" or str(key).endswith(".sigma")) and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    sigma = float(value)
                    break
            if sigma is not None:
                break
        level = [v for section in level for v in section.values() if isinstance(v, dict)]
    return ModelFacts(sigma, str(run_id) if run_id else None, record["num_classes"])


def check_arrays_input(cfg: CertifyConfig) -> None:
    """For ``dataset: arrays``, read and check the arrays (dtypes, NaN / inf, labels, lengths) before Ray
    starts: ``ValueError`` naming the array and its first bad row."""
    if cfg.dataset == "arrays":
        arrays_dataset(cfg.data_dir, cfg.split, num_classes=cfg.num_classes)


def model_identity(cfg: CertifyConfig) -> str:
    """What rows and the manifest record as the model: the resolved checkpoint path, or
    ``model_fn:<module:function>``."""
    if cfg.model_fn is not None:
        return model_fn_identity(cfg.model_fn)
    return storage.identity(cfg.checkpoint)


def model_facts(cfg: CertifyConfig) -> ModelFacts:
    """The ``ModelFacts`` of ``cfg``'s model (reads the checkpoint; nothing for a model_fn)."""
    if cfg.model_fn is not None:
        return ModelFacts()
    return checkpoint_facts(cfg.checkpoint, declared_num_classes(cfg, read_file=False))


def declared_num_classes(cfg: CertifyConfig, read_file: bool = True,
                         facts: ModelFacts | None = None) -> int | None:
    """The class count known before any model runs: ``cfg.num_classes``, else the dataset's (cifar10,
    imagenet), else the checkpoint's recorded one (from ``facts``, or read when ``read_file``); None =
    read from the model's output."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    if cfg.dataset != "arrays":
        return dataset_info(cfg.dataset).num_classes
    if facts is not None:
        return facts.num_classes
    if read_file and cfg.model_fn is None:
        return read_checkpoint(cfg.checkpoint)["num_classes"]
    return None


def resolve_settings(cfg: CertifyConfig, facts: ModelFacts | None = None
                     ) -> tuple[CertifyConfig, str | None]:
    """``cfg`` with sigma filled from the checkpoint when null, and the training run id (if recorded).

    Warns (``UserWarning``) when the certification sigma differs from the recorded training sigma: the
    certificate is valid at any sigma, but a model is usually accurate under its training noise only.
    """
    cfg, train_run_id, _ = _resolve_settings(cfg, facts)
    return cfg, train_run_id


def _resolve_settings(cfg: CertifyConfig, facts: ModelFacts | None = None
                      ) -> tuple[CertifyConfig, str | None, float | None]:
    """``resolve_settings`` plus the checkpoint's training sigma (None when unrecorded), from one read
    (none when ``facts`` were read already)."""
    facts = model_facts(cfg) if facts is None else facts
    ckpt_sigma, train_run_id = facts.sigma, facts.run_id
    if cfg.sigma is not None and ckpt_sigma is not None and not math.isclose(cfg.sigma, ckpt_sigma):
        warnings.warn(f"sigma={cfg.sigma:g} differs from the sigma={ckpt_sigma:g} the checkpoint "
                      f"{cfg.checkpoint!r} was trained with (both are recorded in the rows: sigma, "
                      "train_sigma)", UserWarning, stacklevel=3)
    if cfg.sigma is None:
        if ckpt_sigma is None:
            raise ValueError(f"sigma=None: checkpoint {cfg.checkpoint!r} records no training sigma; "
                             "set sigma")
        cfg = dataclasses.replace(cfg, sigma=ckpt_sigma)
        cfg.validate()
    return cfg, train_run_id, ckpt_sigma


def manifest_settings(cfg: CertifyConfig, use_gpu: bool = False) -> dict[str, Any]:
    """The settings that determine the rows (``MANIFEST_FIELDS``), plus the dataset location. The noise
    scheme is that of the actors' device (GPU actors draw Philox noise, CPU actors torch's)."""
    return {
        "checkpoint": model_identity(cfg), "dataset": cfg.dataset,
        "split": cfg.split, "sigma": cfg.sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
        "seed": cfg.seed, "mode": cfg.tcertify_mode, "grid": list(cfg.grid), "shard_size": cfg.shard_size,
        "data_dir": cfg.data_dir, **shortcut_settings(cfg),
        "noise_scheme": scheme_of_noise(default_noise("cuda" if use_gpu else "cpu")),
        "precision": cfg.precision,
    }


def mixed_device_settings(out_dir: Path | str, settings: dict[str, Any], allow_mixed: bool,
                          existing: Any = NOT_READ) -> dict[str, Any]:
    """``settings``, with the folder's recorded noise scheme when devices may be mixed: CPU actors (scheme
    2) may then add rows to a GPU folder (scheme 3) and back; each row records its own scheme and
    ``run.json``'s ``devices`` lists every device (``adre_ray.analysis.devices``). ``existing``: the
    folder's manifest when read already."""
    if not allow_mixed:
        return settings
    existing = read_manifest(out_dir) if existing is NOT_READ else existing
    if existing is None or "noise_scheme" not in existing:
        return settings
    return {**settings, "noise_scheme": existing["noise_scheme"]}


def shortcut_settings(cfg: CertifyConfig) -> dict[str, Any]:
    """The manifest entries of the runner-up bound and the evaluation shortcuts (they change rows)."""
    return {
        "pb_bound": effective_pb_bound(cfg.tcertify_mode, cfg.pb_bound),
        "skip_misclassified": cfg.skip_misclassified, "early_abstain": cfg.early_abstain,
        "early_abstain_delta": cfg.early_abstain_delta, "early_abstain_wave": cfg.early_abstain_wave,
        "n_policy": cfg.n_policy, "iss_max_radius_loss": cfg.iss_max_radius_loss,
        # the rule of a run without early abstain is moot: recorded as schema 3's so old folders resume
        "early_abstain_rule": cfg.early_abstain_rule if cfg.early_abstain else "cp",
        "stop_when_decided": cfg.stop_when_decided,
        "decide_grid": None if cfg.decide_grid is None else list(cfg.decide_grid),
        "decide_delta": cfg.decide_delta, "target_radius": cfg.target_radius,
    }



def shortcut_rules(cfg: CertifyConfig) -> list[Shortcut]:
    """The evaluation shortcuts ``cfg`` asks for, in the order the scheduler asks them (skip before ISS,
    ISS before the rules that plan at the image's n). Empty = every draw of every image is made."""
    rules: list[Shortcut] = []
    if cfg.skip_misclassified:
        rules.append(SkipMisclassified())
    if cfg.n_policy == "iss":
        rules.append(InputSpecificSize(cfg.shard_size, cfg.sigma, cfg.alpha,  # type: ignore[arg-type]
                                       cfg.iss_max_radius_loss))
    if cfg.sequential():
        grid = None if cfg.decide_grid is None else tuple(cfg.decide_grid)
        rules.append(Sequential(cfg.shard_size, cfg.sigma, cfg.alpha,  # type: ignore[arg-type]
                                cfg.target_radius, grid, cfg.decide_delta))
    elif cfg.early_abstain:
        rules.append(EarlyAbstain(cfg.shard_size, cfg.alpha, cfg.early_abstain_delta, cfg.early_abstain_wave,
                                  cfg.early_abstain_rule))
    return rules


MLFLOW_RUN_FILE = "_mlflow_run.json"
"""In a result folder: the MLflow store and run id of the certification writing it (so a resume continues
that run instead of leaving it RUNNING and opening another). ``_``: Parquet readers skip it."""
LEGACY_MLFLOW_RUN_FILE = "mlflow_run.json"
"""Its name in folders written before (read when the new one is absent)."""


def previous_certify_run(out_dir: Path | str, tracking_uri: str | None) -> str | None:
    """The run id recorded in ``out_dir`` if it belongs to the same MLflow store and still exists there
    (not deleted); None otherwise (a new run is then opened)."""
    uri = resolve_tracking_uri(tracking_uri)
    path = side_file(out_dir, MLFLOW_RUN_FILE, LEGACY_MLFLOW_RUN_FILE)
    if uri == DISABLED or storage.file_type(path) != pafs.FileType.File:
        return None
    try:
        record = json.loads(storage.read_bytes(path))
        if record.get("tracking_uri") != uri:
            return None
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(str(record["run_id"]))
    except Exception:  # unreadable record, unknown run, store moved: start a new run
        return None
    return None if run.info.lifecycle_stage == "deleted" else str(run.info.run_id)


def record_certify_run(out_dir: Path | str, tracking_uri: str | None, run_id: str) -> None:
    """Write ``out_dir/_mlflow_run.json`` (atomically: rename locally, one upload on object storage) naming
    the store and the run."""
    record = {"tracking_uri": resolve_tracking_uri(tracking_uri), "run_id": run_id}
    storage.write_bytes_atomic(storage.join(out_dir, MLFLOW_RUN_FILE), (json.dumps(record) + "\n").encode())


GENERIC_CHECKPOINT_STEMS = ("model", "checkpoint", "best", "last", "final")


def checkpoint_label(checkpoint: str) -> str:
    """A short name telling checkpoints apart: the run folder plus the checkpoint folder for Ray Train
    checkpoints (``my_run/checkpoint_epoch_000149/model.pt`` -> ``my_run-checkpoint_epoch_000149``), the
    file's stem for a named file (``basic_sigma025.pt`` -> ``basic_sigma025``), the folder and stem for a
    generic one (``runs/a/model.pt`` -> ``a-model``). Local paths and URIs alike."""
    parts = [p for p in str(checkpoint).split("?", 1)[0].replace("\\", "/").split("/") if p]
    if parts and parts[-1] == CHECKPOINT_FILENAME:
        parts = parts[:-1]
    if not parts:
        return "checkpoint"
    last = parts[-1]
    stem = last.rsplit(".", 1)[0] if "." in last else last
    if (stem.startswith("checkpoint_") or stem in GENERIC_CHECKPOINT_STEMS) and len(parts) > 1 \
            and not parts[-2].endswith(":"):
        return f"{parts[-2]}-{stem}"
    return stem


def certify_run_name(checkpoint: str, sigma: float, when: float | None = None) -> str:
    """MLflow run name ``certify-<checkpoint label>-sigma<sigma>-<YYYYmmdd-HHMMSS>`` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
    return f"certify-{checkpoint_label(checkpoint)}-sigma{sigma:g}-{stamp}"


def output_location(output_dir: str) -> Path | str:
    """The result folder: a local ``Path``, or the URI itself for object storage (``s3://``, ``gs://``)
    and ``file://`` (``adre_ray.storage``)."""
    return output_dir if storage.is_uri(output_dir) else Path(output_dir).expanduser()


def check_resume(cfg: CertifyConfig) -> ModelFacts:
    """``ValueError`` naming the field when ``cfg.output_dir`` holds a run of other settings (as
    ``run_certification`` would raise, but without Ray and without writing anything). Returns the model's
    facts it read (``run_certification(cfg, facts=...)`` then reads the checkpoint no more)."""
    facts = model_facts(cfg)
    with warnings.catch_warnings():  # run_certification gives the sigma warning, once
        warnings.simplefilter("ignore", UserWarning)
        resolved, _, _ = _resolve_settings(cfg, facts)
    location = output_location(resolved.output_dir)
    precision_known = resolved.precision_setting != "auto" or resolved.use_gpu is not None
    if precision_known:
        precision = resolve_precision(resolved.precision_setting, "cuda" if resolved.use_gpu else "cpu")
        resolved = dataclasses.replace(resolved, precision=precision, amp=None)
    settings = manifest_settings(resolved, bool(resolved.use_gpu))
    # what only the cluster decides (use_gpu: null) is compared once Ray is up: take the folder's value here
    undecided = {"noise_scheme"} if resolved.use_gpu is None or resolved.allow_mixed_devices else set()
    if not precision_known:
        undecided.add("precision")
    existing = read_manifest(location)
    settings.update({key: existing[key] for key in undecided if key in (existing or {})})
    check_manifest_settings(location, settings, existing)
    return facts
