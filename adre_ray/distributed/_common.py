"""Small helpers shared by the Ray jobs: connecting to Ray, storage paths, Ray Train API version."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_storage_path(path: str) -> str:
    """A local folder made absolute (Ray Train needs that); a URI with a scheme (s3://, gs://) unchanged."""
    from adre_ray import storage

    if storage.is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def ray_storage(path: str) -> dict:
    """``storage_path`` (and ``storage_filesystem`` for object storage) for Ray Train's and Tune's
    ``RunConfig``: a local folder made absolute; a URI as the path inside the pyarrow filesystem of
    ``adre_ray.storage.resolve``, which honours ``$AWS_ENDPOINT_URL(_S3)`` wherever the run's processes
    are. The filesystem carries the endpoint, never keys (each node reads its own credentials)."""
    from adre_ray import storage

    resolved = resolve_storage_path(path)
    if not storage.is_remote(resolved):
        return {"storage_path": resolved}
    filesystem, inner = storage.resolve(resolved)
    return {"storage_path": inner, "storage_filesystem": filesystem}


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
                "new private local cluster); an address that accepts no connection within 10 s is refused "
                "(exit 2)")
"""The ``--address`` help of ``adre-ray certify / train / tune``."""


INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""

TERMINATED_EXIT = 143
"""Exit status after SIGTERM (128 + SIGTERM), a scheduler's or ``kill``'s stop."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so a job stops as on Ctrl-C (finished work written, Ray shut
    down) and exits ``TERMINATED_EXIT``."""


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread. Called after ``ray.init``, whose
    own handler (``sys.exit(15)`` wherever the main thread is) ended jobs with an abort and Ray's C++
    stack dump (exit 134)."""
    import signal
    import threading

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def interrupted(command: str, stop: BaseException | None = None) -> int:
    """Print the one line a stopped job says, and return its exit status: ``TERMINATED_EXIT`` after
    SIGTERM (``stop`` a :class:`Terminated`), else ``INTERRUPTED_EXIT``."""
    import sys

    print(f"adre-ray {command}: interrupted; re-run the same command to resume", file=sys.stderr, flush=True)
    return TERMINATED_EXIT if isinstance(stop, Terminated) else INTERRUPTED_EXIT


def os_error_message(err: OSError) -> str:
    """``<path>: <reason>`` of a failed write (full disk, read-only file system, a file in the way)."""
    where = err.filename if err.filename is not None else "output"
    return f"cannot write {str(where)!r}: {err.strerror or err}"


STATE_API_VARIABLE = "RAY_API_SERVER_ADDRESS"
"""Where Ray's State API client sends its queries (the dashboard's URL), read before any other lookup."""


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


START_ATTEMPTS = 3
"""Starts of a private cluster tried when Ray's raylet misses its registration deadline (a loaded host)."""


def start_private_ray(**init_kwargs) -> None:
    """Start a new local Ray cluster (``ray.init(address="local")``) whose processes ask only its own
    dashboard for Ray's State API.

    Ray Train's ``PlacementGroupCleaner`` (Ray >= 2.53) asks the State API every second whether the
    training controller is alive, and removes the run's placement group (killing every live worker) when
    the answer is "no such actor". Its State API client finds the dashboard from ``$RAY_ADDRESS``, else
    from the cluster recorded by ``ray start`` on this machine, else from the first GCS it saw, whose
    dashboard address (8265 even when the dashboard is off) may be served by another Ray cluster of the
    machine. That other cluster does not know the controller, so a live training was killed. Here the
    dashboard gets a free port, and ``RAY_API_SERVER_ADDRESS`` names it while the cluster starts, so the
    raylet and every worker it spawns inherit it; with the dashboard off, nothing answers there and the
    cleaner only warns, as it does whenever the State API is unavailable. A start whose raylet misses
    Ray's fixed 30 s registration deadline (a loaded machine) is tried again, ``START_ATTEMPTS`` in all.
    """
    import ray

    init_kwargs.setdefault("dashboard_port", free_local_port())
    saved = os.environ.get(STATE_API_VARIABLE)
    os.environ[STATE_API_VARIABLE] = f"http://127.0.0.1:{init_kwargs['dashboard_port']}"
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            children = _child_pids()
            try:
                ray.init(address="local", **init_kwargs)
                return
            except Exception as err:  # Ray gives a new raylet a fixed 30 s to register: short under load
                ray.shutdown()
                _stop_children_since(children)  # the failed start's GCS, raylet, ... (Ray keeps no handle)
                if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                    raise
    finally:  # the driver itself keeps Ray's usual lookup
        if saved is None:
            os.environ.pop(STATE_API_VARIABLE, None)
        else:
            os.environ[STATE_API_VARIABLE] = saved


def _child_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _stop_children_since(before: set[int]) -> None:
    """Stop this process's descendants that are not in ``before``."""
    import psutil

    stop_processes([child for child in psutil.Process().children(recursive=True) if child.pid not in before])


def stop_processes(processes: list) -> None:
    """Terminate these ``psutil.Process`` es, then kill those still alive after 10 s."""
    import contextlib

    import psutil

    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(processes, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


ADDRESS_TIMEOUT_S = 10.0
"""How long ``connect_ray`` tries to reach a named cluster address before it gives up (Ray itself retries
the GCS for minutes without a word)."""


def check_reachable(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """``ValueError`` naming ``address`` unless a TCP connection to its host and port opens within
    ``timeout_s`` seconds (``host:port`` of a GCS, or ``ray://host:port`` of a Ray Client server)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or port is None:
        raise ValueError(f"address={address!r}: not host:port, ray://host:port, 'auto' or 'local'")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ValueError(f"address={address!r}: no Ray cluster reachable there within {timeout_s:g} s "
                         f"({reason}); check the address, or use --address local for a private "
                         "cluster") from None


def _recorded_cluster() -> str | None:
    """The address ``ray.init()`` would join without one given (``$RAY_ADDRESS`` or the cluster ``ray
    start`` recorded on this machine), None when it would start a new local cluster."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None)


def connect_ray(address: str | None = None) -> bool:
    """Join the Ray cluster the user named or started, else start a private one; never another job's.

    - ``address`` given: ``"local"`` starts a new private local cluster; ``"auto"`` joins any running
      local cluster (Ray's meaning, chosen by the user); anything else is joined as given;
    - else ``$RAY_ADDRESS`` (set by ``ray job submit``) is joined;
    - else the cluster recorded by ``ray start`` on this machine (Ray's ``ray_current_cluster`` file in
      its temp dir) is joined if it is alive, and otherwise a new private cluster is started. A cluster
      that another ``adre-ray`` job started with ``ray.init()`` is never joined: it is not recorded
      there, and it dies with that job. (``ray.init(address="auto")`` would join it.)

    Private clusters start through ``start_private_ray``. A named address that does not answer within
    ``ADDRESS_TIMEOUT_S`` is a ``ValueError`` naming it. Returns True when this call started or joined Ray
    (the caller then shuts it down); SIGTERM then stops the job like Ctrl-C (``stop_on_sigterm``).
    """
    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target == "local":
        start_private_ray()
    elif target:
        if target != "auto":
            check_reachable(target)
        ray.init(address=target)
    else:
        _join_recorded_or_start_private()
    stop_on_sigterm()
    return True


def _join_recorded_or_start_private() -> None:
    import ray

    if _recorded_cluster() is not None:
        try:
            ray.init()  # the `ray start` cluster of this machine
            return
        except ConnectionError:  # a stale `ray start` record (that cluster is gone): start a private one
            pass
    start_private_ray()
