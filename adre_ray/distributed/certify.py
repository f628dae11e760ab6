"""Distributed certification: the n0 + n Monte Carlo draws of each image sharded over a pool of Ray actors.

Algorithm of the driver (``run_certification``):

1. select images start, start + skip, ... (at most ``max_images``), drop those already in the output
   folder (resume), and check/write the folder's manifest (``adre_ray.analysis.results``);
2. cut the n0 pilot draws and the n estimation draws of each image into shards of ``shard_size``; the
   shard (idx, stream, s) is sampled with noise seeded by (seed, idx, stream, s), so the summed counts,
   and hence every row, are the same whatever the number of actors, the order or a re-run;
3. keep 2 Ray calls queued per actor, each carrying up to 16 shards (of one image or several: the
   driver's cost is per call), admitting new images as earlier ones drain;
4. when an image's shards are all summed, compute PREDICT (main counts), CERTIFY and T-CERTIFY (pilot +
   main counts) with ``adre_ray.smoothing``, and buffer the row; write buffered rows as an atomic Parquet
   part every ``flush_images`` images or ``flush_seconds``;
5. a call that fails because its actor died has its shards re-queued and the actor replaced (up to
   ``actor_restarts`` times per slot), so the output equals an undisturbed run;
6. summarize (certified accuracy at 0, 0.25, ..., 2.0, ACR, abstain rates) and log to MLflow.

The steps live beside this driver: ``certify_settings`` (the run's resolved settings, manifest entries,
shortcut rules, MLflow run record), ``certify_pool`` (actors and cluster), ``certify_scheduler`` (steps
2-5: an image moves pilot -> main waves -> row), ``certify_rows`` (the row of step 4). This module keeps
the driver, the rows' destination (``PartWriter``: Parquet parts and MLflow) and the command line.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError

from adre_ray import storage
from adre_ray.analysis.devices import record_devices
from adre_ray.analysis.metrics import DEFAULT_RADII, mlflow_metrics, summarize
from adre_ray.analysis.output_folder import check_output_dir, output_folder_lock
from adre_ray.analysis.results import (
    NOT_READ,
    ensure_manifest,
    manifest_record,
    merge_results,
    part_files,
    read_manifest,
    read_parts,
    rows_to_table,
    upgrade_table,
    write_part,
)
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.flags import load_from_args
from adre_ray.data import build_dataset, load_images
from adre_ray.distributed._common import connect_ray, interrupted, os_error_message
from adre_ray.distributed.certify_pool import (  # noqa: F401  (re-exported: the job's public names)
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    CertifyPool,
    _ensure_ray,
    _pool_size,
    actor_batch_size,
    check_certify_paths,
    choose_use_gpu,
    make_pool,
    pool_plan,
    resolve_certify_precision,
    resolve_use_gpu,
)
from adre_ray.distributed.certify_rows import format_summary, result_row
from adre_ray.distributed.certify_scheduler import (  # noqa: F401  (re-exported)
    STALL_MESSAGE_S,
    CertifyHooks,
    ImageInFlight,
    Progress,
    Scheduler,
    ShardTask,
    next_wave,
    progress_bar,
    shard_plan,
)
from adre_ray.distributed.certify_settings import (  # noqa: F401  (re-exported)
    LEGACY_MLFLOW_RUN_FILE,
    MLFLOW_RUN_FILE,
    ModelFacts,
    _resolve_settings,
    certify_run_name,
    check_arrays_input,
    check_resume,
    checkpoint_facts,
    checkpoint_label,
    declared_num_classes,
    manifest_settings,
    mixed_device_settings,
    model_facts,
    model_identity,
    output_location,
    previous_certify_run,
    record_certify_run,
    resolve_settings,
    shortcut_rules,
    shortcut_settings,
)
from adre_ray.parsers import CERTIFY_FLAG_NAMES, certify_parser
from adre_ray.precision import precision_params
from adre_ray.smoothing.shortcuts import Shortcut, row_fields
from adre_ray.tracking import log_artifact, log_config, log_metrics, mlflow_run, set_tags


@dataclass
class CertifyResult:
    """What ``run_certification`` returns: the result folder, the summary of its selected images, the run."""

    output_dir: Path | str
    summary: dict[str, float]
    mlflow_run_id: str | None
    images_certified: int = 0
    samples_per_s: float = 0.0


def select_indices(cfg: CertifyConfig, split_size: int) -> list[int]:
    """Images start, start + skip, ... below ``split_size``, at most ``max_images`` of them."""
    chosen = range(cfg.start, split_size, cfg.skip)
    if cfg.max_images is not None:
        chosen = chosen[: cfg.max_images]
    return list(chosen)


def run_certification(cfg: CertifyConfig, *, hooks: CertifyHooks | None = None,
                      pool: CertifyPool | None = None, shortcuts: Sequence[Shortcut] | None = None,
                      facts: ModelFacts | None = None) -> CertifyResult:
    """Certify the selected images of ``cfg`` into ``cfg.output_dir``; resume what is already there.

    Every selected image ends up in the folder exactly once, with the values an undisturbed
    single-actor run would give (time_s aside). ``ValueError`` for bad settings, a folder holding a
    different run, or a corrupt part. ``pool``: warm actors of the same checkpoint to use (its first
    ``num_actors`` slots, all when null); it is left running. Without it a pool is made and shut down.
    ``shortcuts``: the evaluation shortcut rules to use (adre_ray.smoothing.shortcuts.Shortcut); None =
    those ``cfg`` asks for (``shortcut_rules``). ``facts``: the checkpoint's, when read already
    (``check_resume``). The checkpoint, the manifest and each part are read once.
    """
    cfg.validate()
    hooks = hooks or CertifyHooks()
    out_dir = output_location(cfg.output_dir)
    parts = read_parts(part_files(out_dir))  # a corrupt part is named before Ray is needed
    facts = model_facts(cfg) if facts is None else facts
    cfg, train_run_id, train_sigma = _resolve_settings(cfg, facts)
    num_classes = declared_num_classes(cfg, facts=facts)
    selected = _selected_images(cfg)  # bad data is named before Ray is needed
    check_certify_paths(cfg)  # needs the cluster: does it span nodes?
    cfg = resolve_certify_precision(cfg)  # after the data checks: may need the cluster (auto, use_gpu null)
    with output_folder_lock(out_dir):  # one run at a time per folder (released by the OS if we die)
        manifest = _ensure_manifest(cfg, out_dir)
        parts = {file: parts[file] if file in parts else read_parts([file])[file]  # written since: none
                 for file in part_files(out_dir)}                                 # unless another run
        done_before = {idx for table in parts.values() for idx in table.column("idx").to_pylist()}
        todo = [i for i in selected if i not in done_before]
        written: dict[Path | str, Any] = {}  # this run's parts: path -> table
        with _mlflow_certify_run(cfg, out_dir, train_run_id, len(selected), len(todo)) as run_id:
            rules = shortcut_rules(cfg) if shortcuts is None else list(shortcuts)
            progress = _certify_images_or_job_error(cfg, todo, num_classes, train_run_id, out_dir, hooks,
                                                    run_id, pool, train_sigma, len(selected) - len(todo),
                                                    rules, facts, manifest, written)
            table = merge_results([*parts.values(), *written.values()], [*parts, *written])
            chosen = set(selected)
            table = table.take([i for i, idx in enumerate(table.column("idx").to_pylist()) if idx in chosen])
            summary = _summary(table, progress)
            if run_id:
                log_metrics(mlflow_metrics(summary), step=len(table), tracking_uri=cfg.tracking_uri)
                set_tags({"output_dir": storage.identity(out_dir)}, tracking_uri=cfg.tracking_uri)
                if isinstance(out_dir, Path):  # object storage stays where it is; the tag points to it
                    log_artifact(out_dir, "results", tracking_uri=cfg.tracking_uri)
    print(format_summary(summary, out_dir))
    return CertifyResult(output_dir=out_dir, summary=summary, mlflow_run_id=run_id,
                         images_certified=progress.done, samples_per_s=summary["samples_per_s"])


def _selected_images(cfg: CertifyConfig) -> list[int]:
    """``select_indices`` over the split; ``ValueError`` when ``start`` is beyond it."""
    split_size = len(build_dataset(cfg.dataset, cfg.data_dir, cfg.split, augment=False))  # type: ignore[arg-type]
    selected = select_indices(cfg, split_size)
    if not selected:
        raise ValueError(f"start={cfg.start}: beyond the {split_size} images of the {cfg.split!r} split")
    return selected


def _ensure_manifest(cfg: CertifyConfig, out_dir: Path | str) -> dict[str, Any]:
    """Read the folder's manifest (once), check it against ``cfg`` or write it for a new run; return it."""
    existing = read_manifest(out_dir)
    settings = mixed_device_settings(out_dir, manifest_settings(cfg, resolve_use_gpu(cfg)),
                                     cfg.allow_mixed_devices, existing)
    ensure_manifest(out_dir, settings, existing)
    return existing if existing is not None else manifest_record(settings)


@contextlib.contextmanager
def _mlflow_certify_run(cfg: CertifyConfig, out_dir: Path | str, train_run_id: str | None, selected: int,
                        todo: int) -> Iterator[str | None]:
    """The MLflow run of this folder (continued on a resume, recorded in ``_mlflow_run.json`` when new),
    with the run's parameters; yields its id (None when tracking is off)."""
    tags = {"job": "certify", **({"train_run_id": train_run_id} if train_run_id else {})}
    run_name = certify_run_name(cfg.model_fn or cfg.checkpoint, cfg.sigma)  # type: ignore[arg-type]
    previous_run_id = previous_certify_run(out_dir, cfg.tracking_uri)
    with mlflow_run(cfg.experiment, run_name=run_name, tracking_uri=cfg.tracking_uri,
                    run_id=previous_run_id, tags=None if previous_run_id else tags) as run:
        run_id = run.info.run_id or None
        if run_id and run_id != previous_run_id:
            record_certify_run(out_dir, cfg.tracking_uri, run_id)
        if run_id:
            params = precision_params(cfg.flat_dict(), cfg.precision)  # resolved, never auto
            log_config({**params, "num_images_selected": selected, "num_images_resumed": selected - todo},
                       tracking_uri=cfg.tracking_uri)
        yield run_id


def _summary(table: Any, progress: Progress) -> dict[str, float]:
    """``summarize`` of the selected images' rows, with this run's speed and image count."""
    summary = summarize(table, DEFAULT_RADII)
    summary["samples_per_s"] = progress.samples_per_s()
    summary["images_certified_this_run"] = float(progress.done)
    return summary


def _certify_images_or_job_error(*args: Any) -> Progress:
    """``_certify_images``, with an actor's ``ValueError`` (e.g. ``NonFiniteLogitsError`` naming the
    checkpoint) re-raised as itself rather than wrapped in Ray's ``RayTaskError`` and its remote traceback,
    so ``adre-ray certify`` prints the one message and exits 2. The failed image is not written."""
    try:
        return _certify_images(*args)
    except RayTaskError as err:
        if isinstance(err.cause, ValueError):
            raise err.cause from None
        raise


class PartWriter:
    """The rows' destination: an atomic Parquet part every ``flush_images`` rows or ``flush_seconds``, each
    followed by MLflow's ``images_done`` (counting the ``done_before`` images of earlier runs, so a resumed
    run's steps continue where the interrupted one stopped) and the ``on_part_written`` hook."""

    def __init__(self, cfg: CertifyConfig, out_dir: Path | str, run_id: str | None, hooks: CertifyHooks,
                 progress: Progress, done_before: int, written: dict[Path | str, Any]) -> None:
        self.cfg, self.out_dir, self.run_id, self.hooks = cfg, out_dir, run_id, hooks
        self.progress, self.done_before = progress, done_before
        self.written = written  # path -> table of each part written (the summary reads no part back)
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)

    def flush_if_due(self) -> None:
        """A part per ``flush_images`` rows (one loop of the driver may finish several images), then the
        rest when ``flush_seconds`` have passed."""
        overdue = time.monotonic() - self.last_flush >= self.cfg.flush_seconds
        while len(self.buffer) >= self.cfg.flush_images:
            self.flush(self.cfg.flush_images)
        if self.buffer and overdue:
            self.flush()

    def flush(self, count: int | None = None) -> None:
        """Write the first ``count`` buffered rows (all when None) as one part."""
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        count = len(self.buffer) if count is None else count
        rows, self.buffer = sorted(self.buffer[:count], key=lambda r: r["idx"]), self.buffer[count:]
        table = rows_to_table(rows)
        path = write_part(self.out_dir, table)
        self.written[path] = upgrade_table(table)
        if self.run_id:
            images_done = self.done_before + self.progress.done
            log_metrics({"images_done": images_done, "samples_per_s": self.progress.samples_per_s()},
                        step=images_done, tracking_uri=self.cfg.tracking_uri)
        if self.hooks.on_part_written is not None:
            self.hooks.on_part_written(path)


def _certify_images(cfg: CertifyConfig, todo: list[int], num_classes: int | None, train_run_id: str | None,
                    out_dir: Path | str, hooks: CertifyHooks, run_id: str | None,
                    given_pool: CertifyPool | None, train_sigma: float | None = None,
                    done_before: int = 0, rules: Sequence[Shortcut] = (), facts: ModelFacts | None = None,
                    manifest: Any = NOT_READ, written: dict[Path | str, Any] | None = None) -> Progress:
    """Steps 2-5 of the module docstring: the pool (made, or ``given_pool`` configured), the class count,
    the devices recorded, then ``Scheduler.run``. Finished rows are written even when the run stops on an
    exception (a hook's, a KeyboardInterrupt), so a re-run only redoes unfinished images."""
    if not todo:
        return Progress()
    _ensure_ray()
    pool = make_pool(cfg, facts) if given_pool is None else _configured(given_pool, cfg, num_classes)
    if num_classes is None:  # read from the model's output on the first image (every actor checks it too)
        first, _ = load_images(cfg.dataset, cfg.data_dir, cfg.split, todo[:1])
        probe = pool.actors[pool.live()[0]].output_classes.remote(first[0])
        num_classes = int(ray.get(probe, timeout=cfg.stall_timeout_s))
    num_actors = cfg.num_actors or max(len(pool), pool.target)  # the pool may grow to this many
    devices = pool.device_facts(min(len(pool), num_actors), timeout_s=cfg.stall_timeout_s)
    record_devices(out_dir, devices, allow_mixed=cfg.allow_mixed_devices, manifest=manifest)
    row_of = functools.partial(result_row, sigma=cfg.sigma, alpha=cfg.alpha, mode=cfg.tcertify_mode,
                               grid=cfg.grid, seed=cfg.seed, checkpoint=model_identity(cfg),
                               train_run_id=train_run_id, pb_bound=cfg.pb_bound, train_sigma=train_sigma,
                               noise_scheme=devices[0]["noise_scheme"], precision=cfg.precision)

    def make_row(image: ImageInFlight) -> dict[str, Any]:
        return row_of(image.idx, image.label, image.pilot, image.counts, time_s=image.time_s,
                      shortcut=image.shortcut, **row_fields(rules, image))

    progress = progress_bar(cfg, len(todo))
    sink = PartWriter(cfg, out_dir, run_id, hooks, progress, done_before, {} if written is None else written)
    scheduler = Scheduler(cfg, pool, rules, num_actors=num_actors, num_classes=num_classes, make_row=make_row,
                          sink=sink, hooks=hooks, progress=progress)
    try:
        scheduler.run(todo)
    finally:
        try:
            sink.flush()
        finally:
            progress.bar.close()
            if given_pool is None:
                pool.shutdown()
            else:
                scheduler.cancel()
    return progress


def _configured(pool: CertifyPool, cfg: CertifyConfig, num_classes: int | None) -> CertifyPool:
    """A warm ``pool`` set to ``cfg``'s sigma, seed and batch size; ``ValueError`` when it holds another
    model or too few actors."""
    checkpoint_id = model_identity(cfg)
    if pool.checkpoint != checkpoint_id or pool.num_classes != num_classes:
        raise ValueError(f"pool: holds checkpoint={pool.checkpoint!r} ({pool.num_classes} classes), "
                         f"not checkpoint={checkpoint_id!r} ({num_classes} classes)")
    if cfg.num_actors is not None and cfg.num_actors > len(pool):
        raise ValueError(f"num_actors={cfg.num_actors}: the given pool has only {len(pool)} actors")
    pool.configure(sigma=cfg.sigma, seed=cfg.seed, batch_size=cfg.batch_size)  # type: ignore[arg-type]
    return pool


# -------------------------------------------------------------------------------------------------- CLI

FLAG_NAMES = CERTIFY_FLAG_NAMES
build_parser = certify_parser


def config_from_args(argv: Sequence[str]) -> CertifyConfig:
    """YAML file, then ``--set`` overrides, then the field flags (the last word wins).

    Flag values are text parsed by the field's type (``1e-5``, ``100_000``, ``null``, ``0.5,1.0``), never
    as YAML, so a path is never re-interpreted.
    """
    return load_from_args(CertifyConfig, build_parser().parse_args(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """``adre-ray certify``: exit 0 on success, 2 on a configuration, data or output error (message on
    stderr), 130 on Ctrl-C (one line; re-running the same command resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    started = False
    try:
        args = build_parser().parse_args(argv)  # parsed once: the config and --address
        cfg = load_from_args(CertifyConfig, args)
        check_output_dir(cfg.output_dir)  # a file in the way, a read-only folder: before Ray starts
        check_arrays_input(cfg)  # bad arrays: refused before the lock makes the output folder
        facts = check_resume(cfg)  # a bad checkpoint or a folder of other settings: refused before anything
        with output_folder_lock(output_location(cfg.output_dir)):  # held on (re-entered) by the run
            started = connect_ray(args.address)
            result = run_certification(cfg, facts=facts)
    except ValueError as err:
        print(f"adre-ray certify: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up while writing a part (finished parts are kept)
        print(f"adre-ray certify: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # finished images were written on the way out
        return interrupted("certify", stop)
    finally:
        if started:
            ray.shutdown()
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
