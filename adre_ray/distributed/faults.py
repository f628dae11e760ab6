"""Test-only fault injection for Ray Train: a deterministic worker crash, so the fault-tolerance tests can
kill a worker at a chosen epoch, rank and batch. Production never sets it.

The production code has two documented hooks, both no-ops unless ``$ADRE_RAY_FAULT_KILL`` is set:
``build_trainer`` calls :func:`fault_worker_env` (an empty dict normally) to pass the spec to the workers,
and the worker loop wraps its training loader with ``FaultKill.from_env()`` (None normally, so the loader
is used as is).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adre_ray.distributed._common import is_local_storage, train_v2_enabled
from adre_ray.distributed.train_checkpoint import CHECKPOINT_PREFIX

FAULT_KILL_ENV = "ADRE_RAY_FAULT_KILL"
"""Test-only fault injection, read on the driver: ``epoch=E,rank=R,batch=B`` (see :class:`FaultKill`)."""
FAULT_MARKER_ENV = "ADRE_RAY_FAULT_MARKER"
FAULT_MARKER_NAME = ".adre_ray_fault_fired"


@dataclass(frozen=True)
class FaultKill:
    """A deterministic worker crash for fault-tolerance tests; production never sets it.

    Enabled only when ``$ADRE_RAY_FAULT_KILL="epoch=E,rank=R,batch=B"`` is set where the trainer is built
    (:func:`build_trainer` then passes it, with ``marker`` = ``<run folder>/.adre_ray_fault_fired``, to
    the workers through ``RunConfig(worker_runtime_env=...)``). Worker ``rank`` R, in epoch E, just
    before training batch B (0-based, so B steps of the epoch are done), creates ``marker`` with
    ``O_CREAT | O_EXCL`` and calls ``os._exit(1)``; it fires at most once per run folder, so the restarted
    worker group (``run.max_failures >= 1``) trains on.
    """

    epoch: int
    rank: int
    batch: int
    marker: str = ""

    @classmethod
    def parse(cls, text: str, marker: str = "") -> FaultKill:
        """``"epoch=1,rank=1,batch=2"`` -> FaultKill; ValueError naming the text otherwise."""
        fields: dict[str, int] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            is_count = value.isascii() and value.isdigit()
            if key not in ("epoch", "rank", "batch") or key in fields or not is_count:
                raise ValueError(f"{FAULT_KILL_ENV}={text!r}: expected epoch=E,rank=R,batch=B "
                                 "(integers >= 0, each once)")
            fields[key] = int(value)
        if len(fields) != 3:
            raise ValueError(f"{FAULT_KILL_ENV}={text!r}: expected epoch=E,rank=R,batch=B "
                             "(integers >= 0, each once)")
        return cls(marker=marker, **fields)

    @classmethod
    def from_env(cls) -> FaultKill | None:
        """The fault a worker was given (both variables set by :func:`build_trainer`), else None."""
        text, marker = os.environ.get(FAULT_KILL_ENV), os.environ.get(FAULT_MARKER_ENV)
        return cls.parse(text, marker) if text and marker else None

    def wrap(self, loader: Any, *, epoch: int, rank: int) -> Any:
        """``loader``, or for (epoch, rank) = (E, R) an iterable of the same batches that fires before B."""
        return _KillBeforeBatch(loader, self) if (epoch, rank) == (self.epoch, self.rank) else loader

    def fire(self) -> None:
        """Crash this worker process, unless the marker shows the fault already fired in this run."""
        Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(f"epoch={self.epoch},rank={self.rank},batch={self.batch}\n")
        result_queue = _train_v2_result_queue()
        if result_queue is not None:  # inside a Ray Train V2 worker: its controller is there to wait for
            _wait_for_reports_collected(result_queue)
            if self.epoch > 0:
                _wait_for_checkpoint_registered(Path(self.marker).parent, self.epoch - 1)
        print(f"[adre-ray train] fault injection: rank {self.rank} exits in epoch {self.epoch} "
              f"before batch {self.batch}", file=sys.__stdout__ or sys.stdout, flush=True)
        os._exit(1)


class _KillBeforeBatch:
    """The batches of ``loader`` (same length); ``fault.fire()`` runs before batch ``fault.batch``."""

    def __init__(self, loader: Any, fault: FaultKill) -> None:
        self.loader, self.fault = loader, fault

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for position, batch in enumerate(self.loader):
            if position == self.fault.batch:
                self.fault.fire()
            yield batch


def _train_v2_result_queue() -> Any:
    """This Ray Train V2 worker's queue of reports not yet collected; None outside a V2 worker."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().get_result_queue()
    except Exception:  # noqa: BLE001 - V1, or not inside a Ray Train worker
        return None


def _wait_for_reports_collected(result_queue: Any, timeout_s: float = 60.0) -> None:
    """Block until the Ray Train V2 controller has collected this worker's earlier reports (its
    ``result_queue`` is empty), so the crash happens after the last checkpoint was committed, as in a real
    failure between two epochs' reports."""
    deadline = time.monotonic() + timeout_s
    while not result_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_for_checkpoint_registered(run_folder: Path, epoch: int, timeout_s: float = 60.0) -> None:
    """Block until the controller's checkpoint record in ``run_folder`` (Ray Train's
    ``checkpoint_manager_snapshot.json``, written when it registers a checkpoint) lists epoch ``epoch``'s
    checkpoint: an empty result queue means the report was taken, not yet that its checkpoint is the one
    a restarted worker group resumes from."""
    wanted = f'"{CHECKPOINT_PREFIX}{epoch:06d}"'
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if wanted in snapshot.read_text():
                return
        except OSError:  # not written yet
            pass
        time.sleep(0.1)


def fault_worker_env(run_path: str) -> dict[str, str]:
    """Env vars for the workers: empty unless ``$ADRE_RAY_FAULT_KILL`` is set here (then validated; the
    marker lives in the local run folder ``run_path``)."""
    text = os.environ.get(FAULT_KILL_ENV)
    if not text:
        return {}
    FaultKill.parse(text)
    if not is_local_storage(run_path):
        raise ValueError(f"{FAULT_KILL_ENV}={text!r}: fault injection needs a local run.storage_path, "
                         f"not {run_path!r}")
    if not train_v2_enabled():
        raise ValueError(f"{FAULT_KILL_ENV}={text!r}: fault injection needs Ray Train V2")
    return {FAULT_KILL_ENV: text, FAULT_MARKER_ENV: f"{run_path.removeprefix('file://')}/{FAULT_MARKER_NAME}"}
