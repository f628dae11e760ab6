"""A worker's device: the CUDA preflight, the numeric settings that can change results, and their record.

No Ray, no config: training workers (``adre_ray.distributed.train``) and certification actors
(``adre_ray.distributed.worker``) call these after Ray placed them.

- ``require_cuda(job)``: a worker that was asked for a GPU stops with one message when torch cannot use
  CUDA (typically a driver older than the one torch's CUDA build needs), instead of training on the CPU
  or crashing later on ``.to("cuda")``.
- ``set_numerics(device, deterministic=...)``: cuDNN autotuning on (fixed shapes) by default; with
  ``deterministic``, deterministic algorithms, no autotuning and no TF32, so a re-run on the same device
  model gives the same logits bit for bit.
- ``device_facts(...)``: what a result folder records about the device (model, numeric flags, noise
  generator), so folders never mix devices silently.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch

CUDA_DRIVER_MINIMUM = {"13": 580, "12": 525, "11": 450}
"""Oldest NVIDIA driver branch each CUDA major version runs on (NVIDIA's CUDA compatibility table:
13.x needs R580, 12.x R525, 11.x R450)."""

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` that makes cuBLAS deterministic (PyTorch's reproducibility notes)."""


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version on this node (``/proc/driver/nvidia/version``, else
    ``nvidia-smi``), or None when no driver is installed."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as handle:
            for word in handle.readline().split():
                if word[:1].isdigit() and "." in word:
                    return word
    except OSError:
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    version = done.stdout.strip().splitlines()[0].strip() if done.stdout.strip() else ""
    return version or None


def cuda_problem() -> str | None:
    """Why torch cannot use a GPU on this node (driver, torch's CUDA version, what to install); None if
    it can."""
    if torch.cuda.is_available():
        return None
    cuda = torch.version.cuda
    driver = nvidia_driver_version()
    if cuda is None:
        return (f"this torch {torch.__version__} is a CPU-only build; install a CUDA build "
                "(pip install torch from https://download.pytorch.org/whl/cu126 or cu130) on the GPU nodes")
    needed = CUDA_DRIVER_MINIMUM.get(cuda.split(".")[0])
    need = f"NVIDIA driver >= {needed}" if needed else "a matching NVIDIA driver"
    have = f"this node has driver {driver}" if driver else "this node has no NVIDIA driver (no GPU visible)"
    return (f"torch {torch.__version__} is built for CUDA {cuda}, which needs {need}; {have}. Install "
            f"driver {needed or '(see NVIDIA CUDA compatibility)'} or newer, or a torch build for an older "
            "CUDA (e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126, driver >= 525)")


def require_cuda(job: str) -> None:
    """``RuntimeError`` with ``cuda_problem()`` when ``job`` was asked for GPUs and torch cannot use CUDA
    here: a GPU job never falls back to the CPU."""
    problem = cuda_problem()
    if problem is not None:
        raise RuntimeError(f"{job}: GPUs were asked for (use_gpu) but CUDA is unavailable on "
                           f"{platform.node()}: {problem}")


def set_numerics(device: torch.device | str, *, deterministic: bool = False) -> None:
    """Set this process's numeric flags for work on ``device``.

    CUDA: ``cudnn.benchmark`` on (shapes are fixed, so autotuning pays once), TF32 left at torch's
    defaults (convolutions on, matmuls off). ``deterministic`` (any device):
    ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic without autotuning, TF32 off, and
    ``CUBLAS_WORKSPACE_CONFIG`` set; then the same inputs give the same outputs on the same device model
    (at some speed: see docs/performance.md).
    """
    on_cuda = torch.device(device).type == "cuda"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif on_cuda:
        torch.backends.cudnn.benchmark = True


def device_name(device: torch.device | str) -> str:
    """The GPU's model name (``torch.cuda.get_device_name``; a MIG slice names its parent GPU), or the
    CPU's (``platform.processor()``, else the machine type) for a CPU device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_facts(device: torch.device | str, *, autocast_dtype: torch.dtype | None, noise: str,
                 noise_scheme: int) -> dict[str, Any]:
    """The facts a result records about the device that made it: type, model, the autocast dtype in
    effect, TF32, deterministic algorithms, cuDNN autotuning, and the noise generator and its scheme."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    return {
        "type": device.type,
        "model": device_name(device),
        "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype is not None else "float32",
        "tf32_matmul": bool(on_cuda and torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(on_cuda and torch.backends.cudnn.allow_tf32),
        "deterministic": bool(torch.are_deterministic_algorithms_enabled()),
        "cudnn_benchmark": bool(on_cuda and torch.backends.cudnn.benchmark),
        "noise": noise,
        "noise_scheme": int(noise_scheme),
    }


__all__ = ["CUDA_DRIVER_MINIMUM", "cuda_problem", "device_facts", "device_name", "nvidia_driver_version",
           "require_cuda", "set_numerics"]
