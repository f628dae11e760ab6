"""Shared pieces of the benchmarks: model set-up, alternating timed runs, medians, machine facts.

Every benchmark times two or more variants in the same process on the same model, alternating them
round by round (so a burst of load from other processes hits all variants alike) and reports medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from adre_ray.data.info import dataset_info
from adre_ray.models import build_model, check_model_name

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def default_dataset(model_name: str) -> str:
    """imagenet for the ImageNet architectures (resnet50), cifar10 for the others."""
    return "imagenet" if model_name == "resnet50" else "cifar10"


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA device is available")
    return device


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (None: leave the default); returns the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}: must be >= 1")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def make_model(name: str, dataset: str, device: torch.device,
               seed: int = 0) -> tuple[torch.nn.Module, int, int]:
    """``(model, num_classes, image_size)``: a seeded, randomly initialized ``name`` on ``device``.

    Timing does not depend on the weights' values, so no checkpoint is needed.
    """
    check_model_name(name)
    info = dataset_info(dataset)
    torch.manual_seed(seed)
    model = build_model(name, info.num_classes, dataset).to(device)
    return model, info.num_classes, info.image_size


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(variants: dict[str, Callable[[], object]], repeat: int, device: torch.device,
              clock: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Seconds of each variant over ``repeat`` rounds; each round runs every variant once, the order
    reversed every other round (no variant always goes first). Call the variants once before (warm-up).
    ``clock`` (default ``time.perf_counter``, wall time) may be ``time.process_time`` (CPU time)."""
    clock = clock or time.perf_counter
    if repeat < 1:
        raise ValueError(f"repeat={repeat}: must be >= 1")
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeat):
        for name in names if round_ % 2 == 0 else reversed(names):
            synchronize(device)
            start = clock()
            variants[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_model() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(device: torch.device) -> str:
    """One line: date, device, torch version, threads and the 1-minute load average."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_model()} ({os.cpu_count()} CPUs, capability {torch.backends.cpu.get_cpu_capability()})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now} | {where} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
            f"load {load:.2f}")


def add_common_arguments(parser: argparse.ArgumentParser, *, model: str, batch_size: int) -> None:
    """--model --dataset --batch-size --dtype --channels-last --compile --device --threads --repeat --seed."""
    parser.add_argument("--model", default=model, help="small_cnn, cifar_resnet20, cifar_resnet110, resnet50")
    parser.add_argument("--dataset", default=None, help="default: imagenet for resnet50, else cifar10")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="autocast dtype of our forward pass (the noise and x + d stay fp32)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) the model")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: one certification actor per core)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--seed", type=int, default=0)
