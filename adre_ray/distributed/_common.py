"""Small helpers shared by the Ray jobs: connecting to Ray, storage paths, Ray Train API version."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_storage_path(path: str) -> str:
    """A local folder made absolute (Ray Train needs that); a URI with a scheme (s3://, gs://) unchanged."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def is_local_storage(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def train_v2_enabled() -> bool:
    """Whether Ray Train's V2 API is active (the default in Ray >= 2.51; ``RAY_TRAIN_V2_ENABLED=0`` = V1)."""
    try:
        from ray.train.v2._internal.constants import is_v2_enabled
    except ImportError:  # Ray without V2
        return False
    return bool(is_v2_enabled())


ADDRESS_HELP = ("Ray cluster to use: an address (host:port, ray://host:10001), 'auto' (any running "
                "local cluster), or 'local' (a new private one); never another job's private cluster "
                "(default: $RAY_ADDRESS, else the cluster started on this machine with `ray start`, else a "
                "new private local cluster)")
"""The ``--address`` help of ``adre-ray certify / train / tune``."""


INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def interrupted(command: str) -> int:
    """Print the one line a stopped job says, and return the exit status ``INTERRUPTED_EXIT``."""
    import sys

    print(f"adre-ray {command}: interrupted; re-run the same command to resume", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT


def os_error_message(err: OSError) -> str:
    """``<path>: <reason>`` of a failed write (full disk, read-only file system, a file in the way)."""
    where = err.filename if err.filename is not None else "output"
    return f"cannot write {str(where)!r}: {err.strerror or err}"


def connect_ray(address: str | None = None) -> bool:
    """Join the Ray cluster the user named or started, else start a private one; never another job's.

    - ``address`` given: ``"local"`` starts a new private local cluster; ``"auto"`` joins any running
      local cluster (Ray's meaning, chosen by the user); anything else is joined as given;
    - else ``$RAY_ADDRESS`` (set by ``ray job submit``) is joined;
    - else the cluster recorded by ``ray start`` on this machine (Ray's ``ray_current_cluster`` file in
      its temp dir) is joined if it is alive, and otherwise a new private cluster is started. A cluster
      that another ``adre-ray`` job started with ``ray.init()`` is never joined: it is not recorded
      there, and it dies with that job. (``ray.init(address="auto")`` would join it.)

    Returns True when this call started or joined Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return True
    try:
        ray.init()  # the `ray start` cluster of this machine, else a new private one
    except ConnectionError:  # a stale `ray start` record (that cluster is gone): start a private one
        ray.init(address="local")
    return True
