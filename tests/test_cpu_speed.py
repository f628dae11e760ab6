"""CPU speed settings that must not change values: the allocator setting of CPU actors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAULTS_OF_BATCHES = """
import resource, sys, torch
from adre_ray.smoothing.cpu_speed import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def batch():  # the small MNIST net's buffers at batch 8,192: noise, two activations, logits
    noise = torch.empty(8192 * 49).fill_(1.0)
    h1 = torch.empty(8192 * 144).fill_(1.0)
    h2 = torch.empty(8192 * 100).fill_(1.0)
    del h1
    logits = torch.empty(8192 * 10).fill_(1.0)
    del h2, logits, noise
for _ in range(3):  # warm up: the heap reaches its size
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_freed_memory_stops_page_faults_at_every_batch():
    # glibc's static defaults made explicit (its dynamic thresholds depend on the process's history): every
    # block above 128 KiB is mapped afresh and unmapped when freed, so each batch faults its pages in
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_BATCHES, mode], capture_output=True, text=True,
                             check=True, env=env)
        return int(run.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default >= 20 * 1000  # ~2,000 page faults per batch
    assert kept < 200  # keep_freed_memory overrides them: the pages stay, a handful of faults in 20 batches
