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

from adre_ray.models.checkpoint import load_model_checkpoint
from adre_ray.models.model_fn import build_model_fn
from adre_ray.precision import autocast_dtype
from adre_ray.smoothing.sampler import NonFiniteLogitsError, prepare_model, sample_counts


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
    autotuning (``cudnn.benchmark``) is switched on (fixed shapes).
    """

    def __init__(self, checkpoint: str, *, num_classes: int, sigma: float, seed: int, batch_size: int,
                 device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
                 cpu_threads: int = 1, compile: bool = False, cuda_graphs: bool = False,
                 model_fn: str | None = None) -> None:
        if device == "cpu":
            torch.set_num_threads(cpu_threads)
        self.device = torch.device(device)
        self.checkpoint = str(checkpoint)
        if model_fn is not None:  # any nn.Module on [0, 1] images; its output size is checked per batch
            model, meta = build_model_fn(model_fn), {"model_fn": model_fn}
        else:
            model, meta = load_model_checkpoint(checkpoint, map_location=str(self.device),
                                                expected_num_classes=num_classes)
        model = model.to(self.device).eval()
        on_gpu = self.device.type == "cuda"
        self.channels_last = bool(channels_last)
        if on_gpu:
            torch.backends.cudnn.benchmark = True
        model = prepare_model(model, channels_last=self.channels_last, compile=bool(compile),
                              cuda_graphs=bool(cuda_graphs and on_gpu))
        self.pad_batches = bool(compile or (cuda_graphs and on_gpu))
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

    def count(self, image: Any, idx: int, stream: int, shard: int, num: int) -> np.ndarray:
        """Counts (int64, length num_classes) of argmax f(image + d) over the ``num`` draws of this shard.

        A NaN / infinite logit fails the shard with ``NonFiniteLogitsError`` naming the checkpoint.
        """
        x = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
        try:
            counts = sample_counts(self.model, x, num, self.num_classes, self.sigma,
                                   batch_size=self.batch_size, seed=self.seed, idx=idx, shard=shard,
                                   stream=stream, amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                                   pad_batches=self.pad_batches)
        except NonFiniteLogitsError as err:
            raise NonFiniteLogitsError(f"checkpoint={self.checkpoint!r}: {err} (NaN or infinite weights, or "
                                       "a model that overflows; no certificate can come from it)") from None
        return counts.numpy()

    def count_timed(self, image: Any, idx: int, stream: int, shard: int,
                    num: int) -> tuple[np.ndarray, float]:
        """``count`` plus the seconds it took on this actor (the driver sums them into ``time_s``)."""
        began = time.perf_counter()
        counts = self.count(image, idx, stream, shard, num)
        return counts, time.perf_counter() - began

    def where(self) -> dict[str, Any]:
        """Host, pid and device of this actor (for logs and tests)."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device)}
