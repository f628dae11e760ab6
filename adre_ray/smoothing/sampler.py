"""Monte Carlo noise sampler: class counts of f(x + d), d ~ N(0, sigma^2 I), for one image.

Determinism contract (ARCHITECTURE.md, "Randomness"): the noise of (global seed, image idx, stream,
shard) comes from one generator keyed by ``noise_seed(seed, idx, shard, stream)``, and every value is a
function of those keys and its position in the shard alone. The counts of a shard therefore depend on
(seed, idx, stream, shard, num) and the model only: not on the batch size, on which actor ran the
shard, in which order, or on the GPU model. Two generators (``noise=``):

- ``"philox"`` (noise scheme ``PHILOX_NOISE_SCHEME``, the default on CUDA): the counter-based
  Philox4x32-10 of ``adre_ray.smoothing.noise``, value = function of (key, position);
- ``"torch"`` (noise scheme ``NOISE_SCHEME``, the default on CPU): torch's generator seeded with the key,
  drawn in fixed blocks of ``noise_block(image shape)`` samples, in order. On CPU its values do not
  depend on the launch (and it is ~100x faster there than Philox in torch ops; on x86-64 they are drawn
  by ``torch_cpu_normal``, the same values ~3x faster still); on CUDA ``randn`` sizes
  its launch from the GPU's SM count, so the same key gives other values on an A100, an H100 or a MIG
  slice: never the default there.

The scheme in use is ``noise_scheme(noise)``; results record it with the device facts.
``stream`` separates the pilot draws (``PILOT_STREAM``) from the estimation draws (``MAIN_STREAM``),
so the two sets of counts are independent as CERTIFY requires.

Hot loop: noise is drawn in place on the model's device into a preallocated fp32 buffer (on CPU one batch
at a time where that gives the same values, ``draws_in_batches``: the buffer stays in cache), ``x + sigma *
d`` is formed in one pass (the image is broadcast, never repeated; with ``channels_last`` the same pass
writes NHWC), predictions (the first maximal logit, ``max(dim=1)``) are counted with ``index_add_`` on the
device (``bincount`` would sync with the host on CUDA) and only the final count vector crosses to the host;
non-finite logits are counted per batch (on CPU only when the batch's sum is not finite). No Python loop
touches a sample (the loop is per noise block, one generator call each: ~2**23 values, or per batch).
``prepare_model`` applies the optional speed-ups of the forward pass
(channels_last weights, ``torch.compile``, CUDA graphs); see docs/performance.md for what to use where.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from adre_ray.smoothing import torch_cpu_normal
from adre_ray.smoothing.noise import philox_normal_
from adre_ray.smoothing.params import check_draws, check_sigma
from adre_ray.smoothing.torch_cpu_normal import TORCH_CPU_NORMAL_CHUNK

NOISE_BLOCK_ELEMENTS = 2**23
"""Target values per noise draw: a block holds the largest power of two of samples within it (at least 1)."""

NOISE_SCHEME = 2
"""Version of the noise stream for given keys. 1: blocks of 32 samples (adre-ray <= schema 2); 2: blocks of
``noise_block(shape)`` samples (2048 for 3x32x32, 32 for 3x224x224, so ImageNet-size noise is unchanged).
Recorded in the certification manifest and rows: on CUDA the same seed gives other counts under another
scheme (on CPU, torch's sequential generator happens to give equal values when a sample's value count is a
multiple of 16, e.g. 3x32x32). Scheme 2 is the ``"torch"`` generator, the CPU default; see
``PHILOX_NOISE_SCHEME`` for CUDA's."""

PHILOX_NOISE_SCHEME = 3
"""Noise scheme of the counter-based generator (``noise="philox"``): the same values on every device model."""

NOISE_GENERATORS = ("torch", "philox")
"""Values of ``sample_counts(noise=...)``; see the module docstring."""

PILOT_STREAM = 0
MAIN_STREAM = 1


def default_noise(device: torch.device | str) -> str:
    """The generator a device uses by default: "philox" on CUDA (launch-independent), else "torch"."""
    return "philox" if torch.device(device).type == "cuda" else "torch"


def noise_scheme(noise: str) -> int:
    """The noise scheme number (recorded in manifests and rows) of the generator ``noise``."""
    if noise not in NOISE_GENERATORS:
        raise ValueError(f"noise={noise!r}: must be one of {', '.join(NOISE_GENERATORS)}")
    return PHILOX_NOISE_SCHEME if noise == "philox" else NOISE_SCHEME


class NonFiniteLogitsError(ValueError):
    """The model returned a NaN or infinite logit: its argmax is meaningless, so no count may be kept.

    (A model with NaN weights predicts class 0 for every draw; counting those draws would certify class 0
    with a large radius.)
    """


def noise_seed(seed: int, idx: int, shard: int = 0, stream: int = MAIN_STREAM) -> int:
    """A 63-bit generator seed mixed from (seed, idx, stream, shard) by numpy's SeedSequence."""
    for name, value in (("seed", seed), ("idx", idx), ("shard", shard), ("stream", stream)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    entropy = [int(seed), int(idx), int(stream), int(shard)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def noise_block(image_shape: Sequence[int]) -> int:
    """Samples per noise draw for images of ``image_shape``: the largest power of two p with
    p * numel <= ``NOISE_BLOCK_ELEMENTS`` (at least 1). Block boundaries sit at multiples of p in a shard."""
    numel = math.prod(int(size) for size in image_shape)
    if numel < 1:
        raise ValueError(f"image_shape={tuple(image_shape)}: must have at least one element")
    per_block = max(1, NOISE_BLOCK_ELEMENTS // numel)
    return 1 << (per_block.bit_length() - 1)


def effective_batch_size(batch_size: int, image_shape: Sequence[int] | None = None) -> int:
    """The batch actually run for images of ``image_shape``: below one noise block, the nearest power of
    two (a divisor of the block, so a block is cut into equal batches); above it, whole blocks. Either
    way every batch but a shard's last is full (no padding waste with ``pad_batches``). Without a shape it
    only validates ``batch_size`` and returns it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if image_shape is None:
        return batch_size
    block = noise_block(image_shape)
    if batch_size < block:
        return min(block, 1 << round(math.log2(batch_size)))
    return round(batch_size / block) * block


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


def _noise_filler(noise: str, key: int, device: torch.device,
                  sample_shape: Sequence[int] = ()) -> Callable[[torch.Tensor, int], None]:
    """``fill(part, first)``: writes the N(0, 1) values of samples first, first + 1, ... of the shard with
    key ``key`` into the contiguous float32 ``part`` (``torch``: the generator's next values, so parts
    must come in order; ``philox``: the values at those positions, in any order). ``torch`` on CPU with
    samples of ``sample_shape`` holding >= ``TORCH_CPU_NORMAL_CHUNK`` values (so every part does): drawn by
    ``torch_cpu_normal`` where it is available, the same values ~3x faster."""
    if noise_scheme(noise) == PHILOX_NOISE_SCHEME:
        def fill_philox(part: torch.Tensor, first: int) -> None:
            philox_normal_(part, key, first * math.prod(part.shape[1:]))

        return fill_philox
    if _torch_cpu_chunks(noise, device, sample_shape) and torch_cpu_normal.available():
        normal = torch_cpu_normal.TorchCpuNormal(key)

        def fill_native(part: torch.Tensor, first: int) -> None:
            normal.fill_(part)

        return fill_native
    generator = torch.Generator(device=device)
    generator.manual_seed(key)

    def fill_torch(part: torch.Tensor, first: int) -> None:
        torch.randn(part.shape, generator=generator, device=device, dtype=torch.float32, out=part)

    return fill_torch


def draws_in_batches(noise: str, device: torch.device, batch: int, sample_shape: Sequence[int]) -> bool:
    """Whether a noise block may be drawn batch by batch (a ``batch``-row buffer that stays in cache) with
    the values of one draw per block: torch's generator on CPU when every batch is a whole number of
    ``TORCH_CPU_NORMAL_CHUNK`` values and a sample has at least that many (so a shard's last, shorter
    batch does too). ``batch`` is an effective batch size (``effective_batch_size``)."""
    return _torch_cpu_chunks(noise, device, sample_shape) and \
        batch * math.prod(sample_shape) % TORCH_CPU_NORMAL_CHUNK == 0


def _torch_cpu_chunks(noise: str, device: torch.device, sample_shape: Sequence[int]) -> bool:
    """Torch's generator on CPU with samples of >= ``TORCH_CPU_NORMAL_CHUNK`` values: every part of a shard
    is then drawn by ``normal_``'s 16-value path (never the one for fewer values)."""
    return noise_scheme(noise) == NOISE_SCHEME and torch.device(device).type == "cpu" and \
        math.prod(int(size) for size in sample_shape) >= TORCH_CPU_NORMAL_CHUNK


def _noise_batches(
    x: torch.Tensor, num: int, sigma: float, batch: int, fill: Callable[[torch.Tensor, int], None],
    channels_last: bool, pad: bool = False, in_batches: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield ``x + sigma * d`` (fp32) for consecutive batches of the ``num`` samples (views of one buffer).

    ``d`` is drawn one noise block (``noise_block(x.shape)`` samples, one ``randn`` launch) at a time into
    a contiguous buffer of whole blocks, at block offsets 0, p, 2p, ... of the shard, so the values do not
    depend on ``batch`` or on ``channels_last``. A batch smaller than a block (a power of two dividing it,
    ``effective_batch_size``) takes consecutive slices of it; a larger one (whole blocks) spans several.
    ``in_batches`` (only where ``draws_in_batches`` says the values are the same): a batch smaller than a
    block is drawn on its own into a buffer of one batch instead (~1.2x faster noise for tiny samples on
    CPU: the buffer stays in cache).
    ``torch.add(x, d, alpha=sigma)`` then scales, adds the broadcast image and (for ``channels_last``)
    changes the layout in one pass.
    ``pad``: every yielded tensor has exactly ``batch`` rows (one shape for a compiled model or a CUDA
    graph, whatever ``num``); only its first ``size`` rows are this batch's draws, the rest hold earlier
    inputs or zeros. Use ``_noise_batch_sizes`` for the sizes.
    """
    batch = effective_batch_size(batch, x.shape)
    block = noise_block(x.shape)  # rows per draw
    if in_batches:
        block = min(block, batch)
    held = min(max(batch, block), num)  # whole blocks, or all of a shard shorter than that
    noise = torch.empty((held, *x.shape), device=x.device, dtype=torch.float32)
    noisy = None
    if channels_last or pad:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        rows = batch if pad else min(batch, num)
        noisy = torch.zeros((rows, *x.shape), device=x.device, dtype=torch.float32).contiguous(
            memory_format=memory_format)
    done = 0
    while done < num:
        drawn = min(held, num - done)
        for start in range(0, drawn, block):
            part = noise[start:min(start + block, drawn)]
            fill(part, done + start)
        for start in range(0, drawn, batch):
            d = noise[start:min(start + batch, drawn)]
            out = d if noisy is None else noisy[:d.shape[0]]
            torch.add(x, d, alpha=sigma, out=out)
            yield noisy if pad else out
        done += drawn


def _noise_batch_sizes(x_shape: Sequence[int], num: int, batch: int) -> Iterator[int]:
    """The number of draws in each batch ``_noise_batches`` yields (the same walk, without tensors)."""
    block = noise_block(x_shape)
    batch = effective_batch_size(batch, x_shape)
    held = min(max(batch, block), num)
    done = 0
    while done < num:
        drawn = min(held, num - done)
        for start in range(0, drawn, batch):
            yield min(batch, drawn - start)
        done += drawn


def prepare_model(
    model: torch.nn.Module, *, channels_last: bool = False, compile: bool = False, cuda_graphs: bool = False
) -> torch.nn.Module:
    """The model to pass to ``sample_counts``, set up for fast inference; the weights' values are unchanged.

    ``channels_last``: converts the weights to NHWC in place (cuDNN and oneDNN then run every conv without
    layout reorders); pass ``channels_last=True`` to ``sample_counts`` too. ``compile``: ``torch.compile``
    with inductor, one graph per distinct batch shape (``dynamic=False``: the full batch and a shard's
    last partial batch). On CPU the graph is frozen (weights become constants, so batch norm is folded
    into the convolutions and weights are pre-packed): do not train the model afterwards.
    ``cuda_graphs`` (CUDA only, implies compile): replays each batch as one CUDA graph
    (``mode="reduce-overhead"``), which removes the per-kernel launch cost of small models.
    The model must be in eval mode (certification never uses batch statistics).
    """
    if model.training:
        raise ValueError("model.training=True: call model.eval() before sampling (batch norm, dropout)")
    device = model_device(model)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True: needs a CUDA model (the model is on {device})")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cuda_graphs:
        return torch.compile(model, mode="reduce-overhead", dynamic=False)  # type: ignore[return-value]
    if compile:
        options = {"freezing": True} if device.type == "cpu" else None
        return torch.compile(model, dynamic=False, options=options)  # type: ignore[return-value]
    return model


def fast_bf16_available(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs natively on ``device``: a CUDA GPU with bf16 (Ampere or newer), or a
    CPU with AVX512-BF16 or AMX (oneDNN's bf16 kernels; without them bf16 is emulated and slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # an older torch without these probes
            return False
    return False


def _check_sample(x: torch.Tensor, num: int, num_classes: int, sigma: float, channels_last: bool) -> float:
    """``sigma`` checked (its one rule), and ``num``, ``num_classes`` and the sample ``x``; ValueError
    naming the argument otherwise."""
    sigma = check_sigma(sigma)
    check_draws(num, "num", low=0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1")
    if x.dim() < 1:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected one sample (any shape: (C, H, W), (D,), ...)")
    if channels_last and x.dim() != 3:
        raise ValueError(f"channels_last=True: needs an image (C, H, W), not x.shape={tuple(x.shape)}")
    return sigma


def _nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """The number of rows of ``logits`` holding a NaN or an infinity (a 0-dim int64 tensor on its device).

    On CPU the exact row count runs only when the sum of all logits is not finite (a NaN or an infinity
    anywhere makes it so; finite logits make it so only by overflowing near 3e38): one cheap reduction per
    batch instead of a pass over every logit. On a GPU every batch is counted on the device (a host read
    per batch would stall it)."""
    if logits.device.type == "cpu" and math.isfinite(float(logits.sum())):
        return torch.zeros((), dtype=torch.int64, device=logits.device)
    return (~torch.isfinite(logits)).any(dim=1).sum()


@torch.inference_mode()
def sample_counts(  # 14 parameters one a line and the seeding contract in its docstring; ~30 lines of body
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
    pad_batches: bool = False,
    noise: str | None = None,
) -> torch.Tensor:
    """Counts (int64, CPU, length ``num_classes``) of argmax f(x + d) over ``num`` draws d ~ N(0, sigma^2 I).

    ``x`` is one sample of any shape (an image (C, H, W) in [0, 1] pixel space, a vector (D,), ...); noise
    is added there, so radii are in input coordinates. The model must be in eval mode (it is not changed
    here) and output logits (B, K).
    ``amp_dtype`` (e.g. ``torch.bfloat16``) autocasts the forward pass only; the noise and x + d stay
    fp32, so the smoothed classifier is exactly Gaussian smoothing of the (reduced-precision) base
    classifier and every bound stays valid. ``channels_last`` feeds the batches in NHWC (same values; use
    with a model from ``prepare_model(..., channels_last=True)``). ``pad_batches`` runs every forward pass
    on exactly the (effective) batch size, shorter batches padded (their extra rows are not counted), so
    a compiled model or CUDA graph sees one input shape for every shard, the pilot's included (the model
    must treat rows independently, as every eval-mode classifier does; the cost is the padding: at most
    one batch per shard). None of these options changes the noise. ``noise``: the generator, "philox" or
    "torch" (module docstring); None = ``default_noise(device)``.
    """
    sigma = _check_sample(x, num, num_classes, sigma, channels_last)
    generator_seed = noise_seed(seed, idx, shard, stream)  # validates seed, idx, shard, stream
    device = model_device(model)
    noise = default_noise(device) if noise is None else noise
    noise_scheme(noise)  # validates noise
    batch = effective_batch_size(batch_size, x.shape)  # validates batch_size, also when num == 0
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    if num == 0:
        return counts.cpu()
    x = x.to(device=device, dtype=torch.float32)
    ones = torch.ones(min(batch, num), dtype=torch.int64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # draws with a NaN / inf logit
    fill = _noise_filler(noise, generator_seed, device, x.shape)
    batches = _noise_batches(x, num, float(sigma), batch, fill, channels_last, pad_batches,
                             in_batches=draws_in_batches(noise, device, batch, x.shape))
    sizes = _noise_batch_sizes(x.shape, num, batch)
    with _autocast(device, amp_dtype):
        for noisy, size in zip(batches, sizes, strict=True):
            logits = model(noisy)
            if logits.dim() != 2 or logits.shape[1] != num_classes or logits.shape[0] != noisy.shape[0]:
                raise ValueError(f"model output shape {tuple(logits.shape)}: expected ({noisy.shape[0]}, "
                                 f"{num_classes})")
            counted = logits[:size]
            counts.index_add_(0, counted.max(dim=1).indices, ones[:size])  # argmax: the first maximum
            nonfinite += _nonfinite_rows(counted)
    bad = int(nonfinite)  # the one host read of the flag, next to the counts' own transfer
    if bad:
        raise NonFiniteLogitsError(f"model output: {bad} of {num} draws gave a NaN or infinite logit "
                                   f"(image idx={idx}, stream={stream}, shard={shard}); nothing counted")
    return counts.cpu()
