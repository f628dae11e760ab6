"""Speed of small models on CPU: batch size by model cost, and native kernels for tiny convolutions.

A tiny model (Levine et al.'s small MNIST net: ~16k multiply-adds per sample) spends most of a batch of
1,000 around the forward pass: per-call dispatch, oneDNN's set-up of a convolution whose every output is
a sum of 4 products. Two rules fix that, both functions of the model and the sample shape only (never of
a timing), so every actor makes the same choice and the counts stay a function of (seed, idx, stream,
shard) as the sampler's contract requires:

- ``cpu_batch_size``: the batch holds about ``TARGET_FLOPS_PER_BATCH`` of forward work (counted once with
  ``torch.utils.flop_counter`` on one sample), at least the configured batch size, at most one noise block.
- ``tiny_convolutions``: when every convolution of the model has at most ``TINY_CONV_TAPS`` input taps
  per output (in_channels / groups x kernel area), the CPU forward runs with oneDNN off (PyTorch's native
  convolution: ~2x faster for such convolutions). Large convolutions keep oneDNN.

Neither changes the noise; both change the forward pass's float rounding at most (a different kernel), so
a run keeps one setting throughout (recorded as ``cpu_kernels`` on the worker). ``keep_freed_memory``
(glibc's ``mallopt``, set once by a CPU actor) changes no value at all: it only stops the allocator from
returning each batch's activations to the OS, so their pages are not faulted in again at every batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adre_ray.smoothing.sampler import noise_block

TARGET_FLOPS_PER_BATCH = 2**28
"""Forward FLOPs per CPU batch (~10-30 ms on one core): the per-batch Python and dispatch cost (~0.1 ms)
is then below 1%."""

MAX_CPU_BATCH = 2**16
TINY_CONV_TAPS = 16


def flops_per_sample(model: nn.Module, sample_shape: Sequence[int],
                     device: torch.device | str = "cpu") -> int:
    """FLOPs of one forward pass of ``model`` on one sample (``torch.utils.flop_counter``; 0 if none)."""
    probe = torch.zeros((1, *sample_shape), device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(probe)
    return int(counter.get_total_flops())


def cpu_batch_size(model: nn.Module, sample_shape: Sequence[int], batch_size: int) -> int:
    """The CPU batch: the power of two nearest ``TARGET_FLOPS_PER_BATCH / flops_per_sample``, at least
    ``batch_size``, at most ``min(MAX_CPU_BATCH, noise_block(sample_shape))`` (and never below
    ``batch_size``)."""
    flops = max(1, flops_per_sample(model, sample_shape))
    by_cost = 1 << max(0, round(math.log2(max(1.0, TARGET_FLOPS_PER_BATCH / flops))))
    return max(batch_size, min(by_cost, MAX_CPU_BATCH, noise_block(sample_shape)))


def tiny_convolutions(model: nn.Module) -> bool:
    """Whether the model has convolutions and each has at most ``TINY_CONV_TAPS`` taps per output."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return bool(convs) and all(
        (conv.in_channels // conv.groups) * math.prod(conv.kernel_size) <= TINY_CONV_TAPS for conv in convs)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters (malloc.h)."""
KEPT_FREE_BYTES = 2**28
LARGEST_HEAP_ALLOCATION = 2**25
"""``keep_freed_memory``: freed memory kept at the heap's top, and the largest allocation served from the
heap (glibc's own limit for ``M_MMAP_THRESHOLD``)."""


def keep_freed_memory() -> bool:
    """glibc: keep up to ``KEPT_FREE_BYTES`` of freed memory for reuse, and serve allocations up to
    ``LARGEST_HEAP_ALLOCATION`` from the heap, instead of returning memory to the OS after every batch.
    A CPU actor's per-batch activations (4.7 MB for the small MNIST net's first layer at batch 8,192) are
    otherwise mapped or trimmed and fault their pages back in at every batch (~2,300 page faults per
    100,000 draws, 3-5 % of that model's sampling time). Process-wide, values unchanged; True if set
    (False where there is no glibc ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)) and \
        bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_ALLOCATION))


@contextlib.contextmanager
def cpu_kernels(native_convolutions: bool) -> Iterator[None]:
    """The context of a CPU forward pass: oneDNN off when ``native_convolutions`` (only that switch; the
    previous value is restored on exit)."""
    if not native_convolutions:
        yield
        return
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


__all__ = ["MAX_CPU_BATCH", "TARGET_FLOPS_PER_BATCH", "TINY_CONV_TAPS", "cpu_batch_size", "cpu_kernels",
           "flops_per_sample", "keep_freed_memory", "tiny_convolutions"]
