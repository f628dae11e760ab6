"""The certification worker: loads one model and returns class counts for shards of noise draws (no Ray).

``CertifyWorker`` is the body of the certification actor (``adre_ray.distributed.actors.CertifyActor``
wraps it with ``ray.remote``). This module imports no Ray, so the job's own sampling path runs, and is
timed (``benchmarks/gpu_suite.py``), on a machine without Ray. A shard is identified by (image idx,
stream, shard number) and its noise is seeded by (seed, idx, stream, shard) in
``adre_ray.smoothing.sampler``, so any worker returns the same counts for the same shard on the same
device type and settings.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import torch

from adre_ray.device import device_facts, require_cuda, set_numerics
from adre_ray.models.checkpoint import load_model_checkpoint
from adre_ray.models.model_fn import add_import_paths, build_model_fn
from adre_ray.models.precision import fp32_logits
from adre_ray.precision import autocast_dtype
from adre_ray.smoothing.affine_fold import fold_affine_prefix
from adre_ray.smoothing.cpu_speed import cpu_batch_size, cpu_kernels, keep_freed_memory, tiny_convolutions
from adre_ray.smoothing.sampler import (
    NonFiniteLogitsError,
    default_noise,
    noise_scheme,
    prepare_model,
    sample_counts,
)


def as_tensor(image: Any) -> torch.Tensor:
    """``image`` as a tensor: a tensor as is, an array (the driver ships numpy: read-only and zero-copy in
    Ray's object store) copied into a writable one."""
    return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))


class CertifyWorker:
    """Holds one model (eval mode, on ``device``) and samples counts of f(x + d) for shards of draws.

    The model is the checkpoint's, or (``model_fn``, see ``adre_ray.models.model_fn``) the module a
    ``module:function`` callable returns.

    ``device``: "cpu" or "cuda" (the GPU Ray assigned). On CPU the worker uses ``cpu_threads`` torch
    threads (1 for one actor per core). ``precision`` (resolved: fp32 | bf16 autocast) and
    ``channels_last`` apply on GPU and CPU (on CPU channels_last gives the default layout's counts).
    ``compile`` (``torch.compile``, any device) and ``cuda_graphs`` (GPU only, ignored on CPU) are passed
    to ``prepare_model``; a compiled model gets padded batches (``sample_counts(pad_batches=True)``: one
    input shape for every shard, so one compilation / graph capture; the cost is the padding of each
    shard's last batch, so prefer a ``shard_size`` that is a multiple of the batch size). On GPU cuDNN
    autotuning (``cudnn.benchmark``) is switched on (fixed shapes), unless ``deterministic``
    (``adre_ray.device.set_numerics``). A "cuda" worker first checks that torch can use CUDA here
    (``adre_ray.device.require_cuda``) and stops with the reason if not. Noise comes from the device's
    default generator (``adre_ray.smoothing.sampler.default_noise``: Philox on CUDA). On CPU, an eager
    model's affine prefix is folded into one dense map for small inputs (``model_for``;
    ``adre_ray.smoothing.affine_fold``).
    """

    def __init__(self, checkpoint: str, *, num_classes: int | None, sigma: float, seed: int, batch_size: int,
                 device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
                 cpu_threads: int = 1, compile: bool = False, cuda_graphs: bool = False,
                 model_fn: str | None = None, deterministic: bool = False,
                 import_paths: list[str] | None = None) -> None:
        if device == "cpu":
            torch.set_num_threads(cpu_threads)
            keep_freed_memory()  # no page faults for each batch's activations (cpu_speed)
        add_import_paths([*(import_paths or []), os.getcwd()])  # a model_fn in the driver's working dir
        self.device = torch.device(device)
        if self.device.type == "cuda":
            require_cuda("adre-ray certify")
        set_numerics(self.device, deterministic=deterministic)
        self.noise = default_noise(self.device)
        self.checkpoint = str(checkpoint)
        if model_fn is not None:  # any nn.Module on [0, 1] images; its output size is checked per batch
            model, meta = build_model_fn(model_fn), {"model_fn": model_fn}
        else:
            model, meta = load_model_checkpoint(checkpoint, map_location=str(self.device),
                                                expected_num_classes=num_classes)
        model = fp32_logits(model).to(self.device).eval()  # float32 logits: no bf16 ties in the argmax
        on_gpu = self.device.type == "cuda"
        # CPU: oneDNN off for a model whose convolutions are all tiny (adre_ray.smoothing.cpu_speed)
        self.native_convolutions = not on_gpu and tiny_convolutions(model)
        # channels_last on GPU and on CPU with oneDNN (same counts as NCHW; ~1.4x for a CIFAR ResNet on
        # CPU), not with the native kernels of tiny convolutions (0.63x there); images only (not vectors)
        self.channels_last = bool(channels_last) and not self.native_convolutions
        model = prepare_model(model, channels_last=self.channels_last, compile=bool(compile),
                              cuda_graphs=bool(cuda_graphs and on_gpu))
        self.pad_batches = bool(compile or (cuda_graphs and on_gpu))
        # CPU, eager: the model's leading affine layers as one dense map for tiny inputs (affine_fold)
        self.fold_prefix = not on_gpu and not compile
        self._cpu_batch: dict[tuple[int, ...], int] = {}
        self._sampled_model: dict[tuple[int, ...], torch.nn.Module] = {}
        self.amp_dtype = autocast_dtype(precision)
        self.model = model
        self.meta = meta
        self.num_classes = num_classes
        self.configure(sigma=sigma, seed=seed, batch_size=batch_size)

    def configure(self, *, sigma: float, seed: int, batch_size: int) -> None:
        """Set the run's noise level, global seed and batch size (a warm actor can serve several runs)."""
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self._cpu_batch = {}

    def batch_for(self, shape: tuple[int, ...]) -> int:
        """The batch size for samples of ``shape``: on CPU chosen by the model's cost (at least the
        configured one; ``cpu_speed.cpu_batch_size``), on GPU the configured one."""
        if self.device.type != "cpu":
            return self.batch_size
        if shape not in self._cpu_batch:
            with cpu_kernels(self.native_convolutions):
                self._cpu_batch[shape] = cpu_batch_size(self.model_for(shape), shape, self.batch_size)
        return self._cpu_batch[shape]

    def model_for(self, shape: tuple[int, ...]) -> torch.nn.Module:
        """The module that samples inputs of ``shape``: on CPU (eager) the model with its affine prefix
        folded when that applies (``affine_fold.fold_affine_prefix``: a function of the model and the
        shape only, so every actor samples alike), else the model."""
        if shape not in self._sampled_model:
            folded = fold_affine_prefix(self.model, shape) if self.fold_prefix else None
            self._sampled_model[shape] = self.model if folded is None else folded
        return self._sampled_model[shape]

    def output_classes(self, image: Any) -> int:
        """The model's output size on ``image`` (one sample): the class count when none was declared (set
        here, so later shards count into that many classes); ``ValueError`` if it differs from a declared
        one."""
        x = as_tensor(image)
        with torch.inference_mode():
            logits = self.model(x.to(self.device, torch.float32)[None])
        if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 2:
            raise ValueError(f"checkpoint={self.checkpoint!r}: model output shape {tuple(logits.shape)} for "
                             f"one sample of shape {tuple(x.shape)}: expected (1, num_classes >= 2)")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(f"checkpoint={self.checkpoint!r}: the model outputs {logits.shape[1]} logits, "
                             f"num_classes={self.num_classes}")
        self.num_classes = int(logits.shape[1])
        return self.num_classes

    def count(self, image: Any, idx: int, stream: int, shard: int, num: int) -> np.ndarray:
        """Counts (int64, length num_classes) of argmax f(image + d) over the ``num`` draws of this shard.

        A NaN / infinite logit fails the shard with ``NonFiniteLogitsError`` naming the checkpoint.
        """
        x = as_tensor(image)
        shape = tuple(x.shape)
        if self.num_classes is None:
            self.output_classes(x)
        try:
            with cpu_kernels(self.native_convolutions):
                counts = sample_counts(self.model_for(shape), x, num, self.num_classes, self.sigma,
                                       batch_size=self.batch_for(shape), seed=self.seed, idx=idx,
                                       shard=shard, stream=stream, amp_dtype=self.amp_dtype,
                                       channels_last=self.channels_last and x.dim() == 3,
                                       pad_batches=self.pad_batches, noise=self.noise)
        except NonFiniteLogitsError as err:
            raise NonFiniteLogitsError(f"checkpoint={self.checkpoint!r}: {err} (NaN or infinite weights, or "
                                       "a model that overflows; no certificate can come from it)") from None
        return counts.numpy()

    def count_shards(self, shards: list[tuple[int, int, int, int]],
                     *images: Any) -> tuple[np.ndarray, list[float]]:
        """``count`` of several shards in one call: a (len(shards), num_classes) int64 array and the seconds
        each shard took on this actor (the driver sums them into ``time_s``). ``shards``: (idx, stream,
        shard, num) each; ``images``: their distinct images, in the order their idx first appears (one
        call may carry shards of several images; each shard's counts are ``count``'s, whatever the
        grouping)."""
        pixels = dict(zip(dict.fromkeys(spec[0] for spec in shards), map(as_tensor, images), strict=True))
        counts, seconds = [], []
        for idx, stream, shard, num in shards:
            began = time.perf_counter()
            counts.append(self.count(pixels[idx], idx, stream, shard, num))
            seconds.append(time.perf_counter() - began)
        return np.stack(counts), seconds

    def device_facts(self) -> dict[str, Any]:
        """What the result folder records about this worker's device (``adre_ray.device.device_facts``)."""
        return device_facts(self.device, autocast_dtype=self.amp_dtype, noise=self.noise,
                            noise_scheme=noise_scheme(self.noise))

    def where(self) -> dict[str, Any]:
        """Host, pid and device of this actor (for logs and tests)."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device)}
