"""Certification actors: ``CertifyWorker`` (adre_ray.distributed.worker, no Ray) as a Ray actor class.

Each actor loads the model once and returns class counts for shards of noise draws. A shard is
identified by (image idx, stream, shard number) and its noise is seeded by (seed, idx, stream, shard) in
``adre_ray.smoothing.sampler``, so any actor, on any node, returns the same counts for the same shard:
the driver may re-run a lost actor's shards anywhere.
"""

from __future__ import annotations

import ray

from adre_ray.distributed.worker import CertifyWorker

CertifyActor = ray.remote(CertifyWorker)
"""``CertifyWorker`` as a Ray actor class; resources are set per pool with ``.options``."""

__all__ = ["CertifyActor", "CertifyWorker"]
