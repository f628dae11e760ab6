"""What the connected Ray cluster is and can become, and which paths a job may hand to other nodes.

- ``cluster_facts()``: alive nodes, resources now, and the most the autoscaler can add (its node types,
  as Ray's GCS records them: ``ray._private.state.state.get_cluster_config()``, the source Ray Train and
  Ray Data use for the same question). No autoscaler config = nothing will ever be added.
- ``ask_autoscaler(bundles)``: Ray's ``ray.autoscaler.sdk.request_resources`` (a standing request; an
  empty list withdraws it).
- ``check_cluster_paths(paths, facts, shared_filesystem=...)``: when a job can span nodes, a local path
  that another node must read or write is refused by field name (nodes share no disk unless the user
  declares a shared filesystem).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adre_ray import storage

PROGRESS_EVERY_S = 60.0
"""Seconds between the progress lines of a wait for nodes."""


@dataclass(frozen=True)
class ClusterFacts:
    """One look at the cluster: ``nodes`` alive, ``total`` and ``free`` resources, ``max_resources`` the
    autoscaler's node types can reach (None: no autoscaler), ``client`` = a Ray Client (ray://) driver."""

    nodes: int
    total: Mapping[str, float]
    free: Mapping[str, float]
    max_resources: Mapping[str, float] | None
    autoscaling: bool = False
    client: bool = False

    def can_add(self, key: str) -> bool:
        """The autoscaler can still bring more of resource ``key`` (a node type offers it, below its max)."""
        return (self.autoscaling and self.max_resources is not None
                and self.max_resources.get(key, 0) > self.total.get(key, 0))

    def most(self, key: str) -> int:
        """The most of ``key`` the cluster can ever have: its autoscaler's maximum, else what it has now."""
        if self.autoscaling and self.max_resources is not None:
            return int(max(self.max_resources.get(key, 0), self.total.get(key, 0)))
        return int(self.total.get(key, 0))

    @property
    def spans_nodes(self) -> bool:
        """A job may run on more than one machine: several nodes, an autoscaler that can add one, or a
        driver that is not a node of the cluster (Ray Client)."""
        return self.nodes > 1 or self.autoscaling or self.client


def _autoscaler_config() -> tuple[bool, dict[str, float] | None]:
    """(whether a node type can scale up, max resources of all node types); (False, None) without one."""
    try:
        import ray._private.state as ray_state

        config = ray_state.state.get_cluster_config()
        if not config or not config.node_group_configs:
            return False, None
        scalable = any((g.max_count == -1 or g.max_count > g.min_count) and g.max_count != 0
                       for g in config.node_group_configs if g.resources)
        return scalable, ray_state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: no answer = no autoscaler we can see
        return False, None


def cluster_facts() -> ClusterFacts:
    """The connected cluster as it is now (Ray must be initialized)."""
    import ray

    autoscaling, max_resources = _autoscaler_config()
    try:
        from ray.util.client import ray as client_ray

        client = bool(client_ray.is_connected())
    except Exception:  # noqa: BLE001
        client = False
    return ClusterFacts(nodes=sum(1 for node in ray.nodes() if node.get("Alive")),
                        total=dict(ray.cluster_resources()), free=dict(ray.available_resources()),
                        max_resources=max_resources, autoscaling=autoscaling, client=client)


def ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Standing request for ``bundles`` (``[]`` withdraws it); does nothing without an autoscaler."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def wait_for(key: str, wanted: int, wait_s: float, *, what: str,
             facts: Callable[[], ClusterFacts] = cluster_facts, poll_s: float = 0.5) -> ClusterFacts:
    """Wait until ``wanted`` of resource ``key`` are free, at most ``wait_s`` seconds, with a line on
    stderr at the start and every ``PROGRESS_EVERY_S``; return the last look (the caller decides)."""
    began = time.monotonic()
    said_at = -PROGRESS_EVERY_S
    while True:
        now = facts()
        free = int(now.free.get(key, 0))
        waited = time.monotonic() - began
        if free >= wanted or waited >= wait_s:
            return now
        if waited - said_at >= PROGRESS_EVERY_S:
            so_far = f", {waited:.0f} s so far" if waited >= 1 else ""
            print(f"{what}: waiting up to {wait_s:g} s for {wanted} free {key}(s) ({free} of "
                  f"{int(now.total.get(key, 0))} free now{so_far})", file=sys.stderr, flush=True)
            said_at = waited
        time.sleep(poll_s)


def local_paths(paths: Mapping[str, str | None]) -> dict[str, str]:
    """The entries of ``paths`` (field -> path or URI) that name this machine's disk: plain paths,
    ``file://`` URIs and SQLite / MLflow file stores (``sqlite:///x.db``, ``file:///mlruns``)."""
    found = {}
    for name, path in paths.items():
        if path is None or path == "" or str(path).lower() in ("none", "off", "disabled"):
            continue
        text = str(path)
        if text.startswith("sqlite:") or not storage.is_remote(text):
            found[name] = text
    return found


def check_cluster_paths(paths: Mapping[str, str | None], facts: ClusterFacts, *, shared_filesystem: bool,
                        flag: str) -> None:
    """Refuse (``ValueError`` naming the first field) local paths that other nodes would read or write,
    when the job can span nodes and no shared filesystem was declared (``flag`` says how to declare it)."""
    if shared_filesystem or not facts.spans_nodes:
        return
    local = local_paths(paths)
    if not local:
        return
    name, path = next(iter(local.items()))
    why = (f"{facts.nodes} nodes" if facts.nodes > 1 else
           "an autoscaler that can add nodes" if facts.autoscaling else "a Ray Client driver")
    use = ("an MLflow server (http://...) or 'none'" if name.endswith("tracking_uri")
           else "a URI (s3://, gs://)")
    raise ValueError(f"{name}={path!r}: a local path on a cluster that spans nodes ({why}), which share no "
                     f"disk: other nodes would not see it; use {use}, or {flag} if this path is the same "
                     f"on every node (NFS, FSx)")


class ClusterCapacityError(RuntimeError):
    """The cluster cannot hold a job's workers and nothing will add what is missing."""


class CapacityWatch:
    """Stop a blocking call in the main thread (``trainer.fit()``) when the cluster cannot hold ``needs``
    (resource -> amount) and no autoscaler can add the difference, for ``wait_s`` seconds in a row: Ray
    Train waits forever for the placement group of a worker group that no node will ever fit (a node
    died and none replaces it). Use as a context manager around the call; a stop raises
    ``ClusterCapacityError`` with ``what_to_do`` in its message instead of the interrupt.

    The stop is a simulated SIGINT. Inside the block the watch's own handler answers it (a SIGINT the
    watch did not send goes to the handler it replaced); a handler the call installs and leaves behind
    (Ray Train's ``fit()`` registers one that aborts its controller and keeps the controller alive
    through its closure) is replaced by the one from before the block on exit.

    ``interrupt=False`` (Ray Train V2): the call stops itself, and the watch only names why. V2's
    ``fit()`` answers SIGINT with its own handler, whose graceful abort does not reach a controller that is
    retrying a worker group start (seen on a multi-node cluster: retried for 15 minutes after the abort),
    so the run is bounded by Ray Train's ``FailureConfig(controller_failure_limit)``
    (:func:`controller_failure_limit`), and an error leaving the block while the cluster lacks ``needs``
    (at that moment, or for ``wait_s`` at the last poll) becomes ``ClusterCapacityError``."""

    def __init__(self, needs: Mapping[str, float], wait_s: float, what_to_do: str, *, poll_s: float = 2.0,
                 facts: Callable[[], ClusterFacts] = cluster_facts, interrupt: bool = True) -> None:
        import threading

        self.needs = {key: amount for key, amount in needs.items() if amount > 0}
        self.wait_s, self.what_to_do, self.poll_s, self.facts = wait_s, what_to_do, poll_s, facts
        self.interrupt = interrupt
        self.message: str | None = None
        self._armed = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="adre-ray-capacity-watch")
        self._active = threading.current_thread() is threading.main_thread()
        self._outer_sigint: Any = signal.default_int_handler

    def lacking(self, facts: ClusterFacts) -> str | None:
        for key, amount in self.needs.items():
            if facts.most(key) < amount:
                return (f"the cluster has {facts.most(key):g} {key}s (and no autoscaler to add more) but "
                        f"needs {amount:g}")
        return None

    def _stop_message(self, lack: str) -> str:
        return f"{lack} (waited {self.wait_s:g} s; was a node lost?): {self.what_to_do}"

    def _watch(self) -> None:
        import _thread

        since: float | None = None
        while not self._stop.wait(self.poll_s):
            try:
                lack = self.lacking(self.facts())
            except Exception:  # noqa: BLE001 - a failed look is not a verdict
                continue
            if lack is None:
                since = self.message = None
                continue
            since = time.monotonic() if since is None else since
            if time.monotonic() - since >= self.wait_s:
                with self._armed:
                    if self._stop.is_set():
                        return
                    self.message = self._stop_message(lack)
                    if self.interrupt:
                        self._stop.set()
                        _thread.interrupt_main()
                        return

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.message is not None:
            raise KeyboardInterrupt
        if callable(self._outer_sigint):
            self._outer_sigint(signum, frame)
        elif self._outer_sigint != signal.SIG_IGN:
            signal.default_int_handler(signum, frame)

    def __enter__(self) -> CapacityWatch:
        if self._active:
            self._outer_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            if self.needs:
                self._thread.start()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        with self._armed:
            self._stop.set()
        if self._active and self._outer_sigint is not None:  # None: not installed from Python
            signal.signal(signal.SIGINT, self._outer_sigint)
        if not self.interrupt and kind is not None and issubclass(kind, Exception):
            self._passive_verdict(error)  # type: ignore[arg-type]
        if self.message is None:
            return False
        if self.interrupt and (kind is None or issubclass(kind, KeyboardInterrupt)):
            raise ClusterCapacityError(self.message) from None
        return False

    def _passive_verdict(self, error: BaseException) -> None:
        """Passive mode, the run ended with ``error``: ``ClusterCapacityError`` if the cluster lacks
        ``needs`` now (a fresh look: the last poll may predate the GCS marking a lost node dead) or lacked
        them for ``wait_s`` at the last poll."""
        try:
            lack = self.lacking(self.facts())
        except Exception:  # noqa: BLE001 - no fresh look: keep the last poll's verdict
            lack = None
        if lack is not None:
            self.message = self._stop_message(lack)
        if self.message is not None:
            raise ClusterCapacityError(self.message) from error


def controller_failure_limit(wait_s: float) -> int:
    """Ray Train V2's ``controller_failure_limit`` that ends a run about ``wait_s`` seconds after its worker
    group stopped fitting the cluster: each start attempt waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``
    (60 s) for its placement group and then counts as a controller failure; the limit is the number of
    failures tolerated, so attempts = limit + 1 = ceil(wait_s / timeout), at least one. (Ray's default,
    -1, retries forever.)"""
    timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(0, math.ceil(wait_s / timeout) - 1)
