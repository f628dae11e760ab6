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


def connect_ray(address: str | None = None) -> bool:
    """Connect to ``address``, else ``$RAY_ADDRESS``, else a running local cluster, else start one.

    ``address="local"`` always starts a new private local cluster.

    Returns True when this call started or joined Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return True
    try:
        ray.init(address="auto")
    except (ConnectionError, RuntimeError):
        ray.init()
    return True
