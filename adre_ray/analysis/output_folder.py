"""Guards of a result folder: that it can be written (checked before any work), and a lock held while one
run writes into it, so two concurrent runs never certify the same images into one folder.

The lock is ``fcntl.flock`` on ``<folder>/.adre_ray.lock``, which holds the holder's pid, host, start time
and command line. The operating system releases a flock when its holder dies, however it dies, so a
SIGKILLed run never leaves the folder locked; a clean exit also removes the file. The lock is local: it
protects a folder on this machine's file systems (on NFS, flock is emulated with POSIX locks, which
Linux supports since 2.6.12); for a non-local URI (``s3://...``) no lock is taken.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adre_ray import storage

LOCK_NAME = ".adre_ray.lock"

_HELD: dict[str, int] = {}
"""Canonical folders whose lock this process holds, with the nesting depth."""


class OutputFolderBusyError(ValueError):
    """Another live process holds the lock of the folder."""


def check_output_dir(folder: str | os.PathLike[str], field: str = "output_dir") -> None:
    """``ValueError`` naming ``folder`` if results could not be written there: the path (or a parent) is a
    file, the nearest existing folder is not writable, or its file system has no free space. Creates
    nothing. A URI with a scheme is not checked here (its store reports its own errors)."""
    if storage.is_remote(folder):
        return
    path = storage.local_path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{field}={str(folder)!r}: is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{field}={str(folder)!r}: {str(existing)!r} is a file, so no folder can be made "
                         "below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{field}={str(folder)!r}: {str(existing)!r} is not writable")
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if free == 0:
        raise ValueError(f"{field}={str(folder)!r}: no space left on the file system of {str(existing)!r}")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process (holder unknown)"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")


def _os_error(folder: Path, field: str, err: OSError) -> ValueError:
    reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return ValueError(f"{field}={str(folder)!r}: cannot be written ({reason})")


@contextmanager
def output_folder_lock(folder: str | os.PathLike[str], field: str = "output_dir") -> Iterator[Path | None]:
    """Hold the folder's lock for the ``with`` body (creating the folder if needed); yields the lock file.

    Raises ``OutputFolderBusyError`` (a ``ValueError``) naming the holder when a live process has it, and
    ``ValueError`` naming the folder when it cannot be created or written. For a remote URI yields None.

    The folder is named by its canonical local path (``storage.local_path``): a plain path, a relative
    one, a trailing slash, a symlink and a ``file://`` URI of one folder are one lock. Re-entrant within
    a process (a nested ``with`` on the same folder holds the lock already and yields the same file).
    """
    if storage.is_remote(folder):
        yield None
        return
    root = storage.local_path(folder)
    path = root / LOCK_NAME
    if str(root) in _HELD:
        _HELD[str(root)] += 1
        try:
            yield path
        finally:
            _HELD[str(root)] -= 1
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputFolderBusyError(
                    f"{field}={str(folder)!r}: in use by another run ({_holder(path)}); wait for it to "
                    f"finish or use another {field}") from None
            try:  # the holder before us may have removed the file between our open and our flock
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
    except OSError as err:
        raise _os_error(root, field, err) from err
    _HELD[str(root)] = 1
    try:
        yield path
    finally:
        del _HELD[str(root)]
        try:
            path.unlink(missing_ok=True)  # unlink first, then unlock: see the samestat check above
        finally:
            os.close(fd)
