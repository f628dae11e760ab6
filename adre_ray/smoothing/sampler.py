"""Monte Carlo noise sampler: class counts of f(x + d), d ~ N(0, sigma^2 I), for one image.

Determinism contract (ARCHITECTURE.md, "Randomness"): the noise of (global seed, image idx, stream,
shard) comes from one generator seeded by ``noise_seed(seed, idx, shard, stream)``, drawn in fixed blocks
of ``NOISE_BLOCK`` samples, in order. The counts of a shard therefore depend on (seed, idx, stream,
shard, num) and the model only: not on the batch size, on which actor ran the shard, or in which order.
``stream`` separates the pilot draws (``PILOT_STREAM``) from the estimation draws (``MAIN_STREAM``),
so the two sets of counts are independent as CERTIFY requires.

Hot loop: noise is drawn in place on the model's device into a preallocated buffer, the image is
broadcast (no copies per sample), predictions are counted with ``bincount`` on the device and only the
final count vector crosses to the host. No Python loop touches a sample (the loop is per block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

NOISE_BLOCK = 32
"""Samples per noise draw. Batches are whole blocks, so the stream is the same for any batch size."""

PILOT_STREAM = 0
MAIN_STREAM = 1


def noise_seed(seed: int, idx: int, shard: int = 0, stream: int = MAIN_STREAM) -> int:
    """A 63-bit generator seed mixed from (seed, idx, stream, shard) by numpy's SeedSequence."""
    for name, value in (("seed", seed), ("idx", idx), ("shard", shard), ("stream", stream)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    state = np.random.SeedSequence([int(seed), int(idx), int(stream), int(shard)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def effective_batch_size(batch_size: int) -> int:
    """The batch actually run: ``batch_size`` rounded to a whole number of noise blocks (at least one)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    return max(1, round(batch_size / NOISE_BLOCK)) * NOISE_BLOCK


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _noise_batches(
    x: torch.Tensor, num: int, sigma: float, batch: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield ``x + sigma * d`` for consecutive batches of the ``num`` samples (views of one buffer)."""
    buf = torch.empty((min(batch, num), *x.shape), device=x.device, dtype=x.dtype,
                      memory_format=torch.contiguous_format)
    done = 0
    while done < num:
        size = min(batch, num - done)
        out = buf[:size]
        for start in range(0, size, NOISE_BLOCK):
            block = out[start:start + NOISE_BLOCK]
            torch.randn(block.shape, generator=generator, device=x.device, dtype=x.dtype, out=block)
        out.mul_(sigma).add_(x)
        done += size
        yield out


@torch.inference_mode()
def sample_counts(
    model: torch.nn.Module,
    x: torch.Tensor,
    num: int,
    num_classes: int,
    sigma: float,
    *,
    batch_size: int = 1000,
    seed: int = 0,
    idx: int = 0,
    shard: int = 0,
    stream: int = MAIN_STREAM,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Counts (int64, CPU, length ``num_classes``) of argmax f(x + d) over ``num`` draws d ~ N(0, sigma^2 I).

    ``x`` is one image (C, H, W) in [0, 1] pixel space; noise is added there, so radii are in input
    coordinates. The model must be in eval mode (it is not changed here) and output logits (B, K).
    ``amp_dtype`` (e.g. ``torch.bfloat16``) autocasts the forward pass only; the noise and x + d stay
    fp32, so the smoothed classifier is exactly Gaussian smoothing of the (reduced-precision) base
    classifier and every bound stays valid.
    """
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma={sigma!r}: must be > 0")
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num={num!r}: must be an integer >= 0")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1")
    if x.dim() != 3:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected one image (C, H, W)")
    device = model_device(model)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    if num == 0:
        return counts.cpu()
    x = x.to(device=device, dtype=torch.float32)
    generator = torch.Generator(device=device)
    generator.manual_seed(noise_seed(seed, idx, shard, stream))
    batch = effective_batch_size(batch_size)
    with _autocast(device, amp_dtype):
        for noisy in _noise_batches(x, num, float(sigma), batch, generator):
            if channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            logits = model(noisy)
            if logits.dim() != 2 or logits.shape[1] != num_classes:
                raise ValueError(f"model output shape {tuple(logits.shape)}: expected (batch, {num_classes})")
            counts += torch.bincount(logits.argmax(dim=1), minlength=num_classes)
    return counts.cpu()
