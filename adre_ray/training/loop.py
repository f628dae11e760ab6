"""One training epoch and one noisy evaluation pass: plain functions, no Ray (Ray Train calls them).

Per-step statistics are accumulated on the device and copied to the host once at the end of the epoch,
so a GPU step never waits on the host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from adre_ray.training.losses.base import LossFn
from adre_ray.training.modes import autocast, eval_mode


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` from a ``(x, y)`` pair or a mapping with keys image/label (or x/y)."""
    if isinstance(batch, Mapping):
        for image_key, label_key in (("image", "label"), ("x", "y")):
            if image_key in batch and label_key in batch:
                return batch[image_key], batch[label_key]
        raise ValueError(f"batch keys={sorted(batch)}: expected image/label or x/y")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"batch type={type(batch).__name__}: expected (images, labels) or a mapping")


def _progress(loader: Iterable, enabled: bool, desc: str, total: int | None) -> Iterable:
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, total=total, unit="batch", leave=False)


def _total_batches(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``x`` on ``device``; an image batch (4-D) in channels_last layout when ``channels_last`` (the model's
    layout, so cuDNN does not re-lay out every batch)."""
    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r}: must be None or an integer >= 1")


def _sgd_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
              scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """Backward, optimizer step (through the float16 gradient scaler, if any), then the per-batch
    scheduler step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()


def _per_image(sums: list[float], images: int) -> list[float]:
    """Sums over an epoch's images as per-image means (NaN when no image was seen)."""
    return [total / images if images else math.nan for total in sums]


def _throughput(images: int, start: float) -> dict[str, float]:
    """``time_s`` since ``start`` (``time.perf_counter``) and ``images_per_s``."""
    elapsed = time.perf_counter() - start
    return {"time_s": elapsed, "images_per_s": images / elapsed if elapsed > 0 else math.nan}


def train_one_epoch(  # 11 parameters one a line and the returned metrics documented, ~30 lines of body
    model: torch.nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    device: torch.device | str,
    epoch: int,
    amp_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Run one epoch of ``loss_fn`` with SGD steps; the scheduler (if any) steps once per batch.

    Returns per-image means over the epoch: ``loss``, ``l_per``, ``l_adre``, ``train_acc_noise``
    (fraction of images whose first noisy draw is classified correctly; at x~ for adversarial losses),
    plus ``images``, ``batches``, ``time_s``, ``images_per_s``, ``lr`` (after the last step) and
    ``epsilon`` (attack radius of this epoch; 0 without attack). With ``amp_dtype`` the forward passes
    run under ``torch.autocast`` (bf16 recommended on GPU; float16 uses a gradient scaler).
    ``channels_last``: image batches are fed in channels_last layout (use with a channels_last model).
    """
    _check_max_batches(max_batches)
    device = torch.device(device)
    model.train()
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, l_per, l_adre (x B), correct
    images = batches = 0
    epsilon = 0.0
    total = _total_batches(loader, max_batches)
    start = time.perf_counter()
    for batch in _progress(loader, progress, f"train epoch {epoch}", total):
        if max_batches is not None and batches >= max_batches:
            break
        x, y = unpack_batch(batch)
        x = to_device(x, device, channels_last)
        y = y.to(device, non_blocking=True).long()
        with autocast(device, amp_dtype):
            out = loss_fn(model, x, y, epoch)
        _sgd_step(out.loss, optimizer, scaler, scheduler)
        size = out.batch_size
        parts = (out.loss.detach(), out.l_per, out.l_adre, out.correct)
        values = torch.stack([torch.as_tensor(part, device=device).double() for part in parts])
        values[:3] *= size  # a Python scalar: no host-to-device copy, no sync, per step
        sums += values
        images += size
        batches += 1
        epsilon = out.epsilon
    means = _per_image(sums.tolist(), images)  # the epoch's only host sync
    return {**dict(zip(("loss", "l_per", "l_adre", "train_acc_noise"), means, strict=True)),
            "images": float(images), "batches": float(batches), **_throughput(images, start),
            "lr": float(optimizer.param_groups[0]["lr"]), "epsilon": float(epsilon)}


@torch.no_grad()
def _noisy_and_clean(x: torch.Tensor, sigma: float, generator: torch.Generator | None, rows: int,
                     fixed_shape: bool, channels_last: bool) -> torch.Tensor:
    """``[x + d; x]`` (2B rows, d ~ N(0, sigma^2 I)), zero-padded to 2 * ``rows`` rows if ``fixed_shape``."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype).mul_(sigma)
    inputs = torch.cat([x + noise, x])
    if fixed_shape and x.shape[0] < rows:
        inputs = torch.cat([inputs, inputs.new_zeros((2 * (rows - x.shape[0]), *x.shape[1:]))])
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def evaluate_under_noise(  # 10 parameters one a line and the noise-seeding contract, ~30 lines of body
    model: torch.nn.Module,
    loader: Iterable,
    sigma: float,
    *,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    seed: int | None = None,
    channels_last: bool = False,
    fixed_shape: bool = False,
) -> dict[str, float]:
    """Accuracy of the base classifier on ``x + d`` (one draw d ~ N(0, sigma^2 I) per image) and on ``x``.

    Returns ``acc_noise``, ``acc_clean``, ``images``, ``time_s``, ``images_per_s``. The model runs in eval
    mode and its previous mode is restored. ``seed`` makes the noise reproducible (a private generator
    on ``device``); without it the global torch RNG is used. ``channels_last``: inputs in channels_last
    layout. ``fixed_shape``: a batch smaller than the first is padded with zero rows to its size, so a
    compiled model sees one input shape (the padded rows are not counted; eval mode treats rows
    independently).
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma={sigma!r}: must be a finite number >= 0")
    _check_max_batches(max_batches)
    device = torch.device(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    correct = torch.zeros(2, device=device, dtype=torch.int64)  # noisy, clean
    images = batches = 0
    rows = 0  # the first batch's size: the padded size of later ones (fixed_shape)
    start = time.perf_counter()
    with eval_mode(model):
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            x, y = unpack_batch(batch)
            x = to_device(x, device, channels_last)
            y = y.to(device, non_blocking=True).long()
            size = x.shape[0]
            rows = rows or size
            inputs = _noisy_and_clean(x, sigma, generator, rows, fixed_shape, channels_last)
            with autocast(device, amp_dtype):
                logits = model(inputs)
            predictions = logits[:2 * size].argmax(dim=1).view(2, -1)
            correct += (predictions == y.unsqueeze(0)).sum(dim=1)
            images += x.shape[0]
            batches += 1
    acc_noise, acc_clean = _per_image(correct.tolist(), images)
    return {"acc_noise": acc_noise, "acc_clean": acc_clean, "images": float(images),
            **_throughput(images, start)}
