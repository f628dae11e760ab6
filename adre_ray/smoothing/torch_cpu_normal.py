"""torch's CPU standard normal, value for value, ~3x faster: the noise of the sampler's "torch" generator.

``TorchCpuNormal(seed).fill_(out)`` writes into a contiguous float32 CPU tensor of >= 16 values exactly
what ``torch.randn(out.shape, generator=g, out=out)`` writes for ``g = torch.Generator().manual_seed(seed)``,
call after call (each call continues the stream where the last one stopped, as ``g`` would). torch spends
~3.5 ns per value there (one out-of-line generator call per value, then the transform); a tiny model's
sampling spends ~30 % of its time in it. ``torch_cpu_normal.cpp`` draws the same mt19937 outputs in
vectorizable loops and applies ATen's own Box-Muller (its ``avx_mathfun.h``, included from torch's headers)
while the values are in L1: ~1.2 ns per value on an AVX-512 Xeon (``benchmarks/tiny_model_cpu.py``).

It is used only where it cannot change a value: ``available()`` is True when (1) torch runs its AVX2 or
AVX-512 CPU kernels here (the Box-Muller it reproduces; ``torch.backends.cpu.get_cpu_capability()``),
(2) a C++ compiler built the kernel (once per source, flags, torch version and compiler, cached under
``ADRE_RAY_CACHE_DIR`` or ``~/.cache/adre-ray``; ``CXX`` picks the compiler), and (3) on this machine it gave
torch's values on a probe of ~140,000 values (sizes with and without a 16-value tail, two seeds). Otherwise
the sampler draws with torch's generator: the same values, slower, so nothing a run records depends on
it. ``ADRE_RAY_NATIVE_NOISE=0`` turns it off; ``status()`` says which is in use and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".cpp")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-ffp-contract=fast", "-DCPU_CAPABILITY_AVX2",
                 "-shared", "-fPIC")
"""The flags of torch's AVX2 CPU kernels that matter to the values (FMA contraction as GCC's default)."""
TORCH_KERNELS = ("AVX2", "AVX512")
"""``torch.backends.cpu.get_cpu_capability()`` values whose ``normal_`` the kernel reproduces (ATen's AVX2
Box-Muller; its AVX-512 kernels give the same values, measured, and the probe checks it on every machine)."""
TORCH_CPU_NORMAL_CHUNK = 16
"""torch's CPU ``normal_`` on a float32 tensor of >= 16 values draws one uniform per value from the generator,
in order, then transforms them 16 at a time (Box-Muller on pairs 8 apart), redrawing the last 16 when the
count is not a multiple of 16 (fewer than 16 values are drawn another way). Consecutive calls of >= 16
values each, all but the last a multiple of 16, therefore consume the generator as one call over their
union and give its values (pinned by tests/test_sampler.py)."""
DISABLE_ENV = "ADRE_RAY_NATIVE_NOISE"
CACHE_ENV = "ADRE_RAY_CACHE_DIR"
COMPILE_TIMEOUT_S = 120
PROBE_SEEDS = (0, 2**62 + 12345)
PROBE_SIZES = (16, 17, 49 * 7, 3 * 624 + 5, 2**16 + 9, 2**16)
"""Draws (in this order, each seed's on one generator) compared with torch's before the kernel is used."""

log = logging.getLogger(__name__)


class TorchCpuNormal:
    """The stream of ``torch.randn`` on CPU for ``torch.Generator().manual_seed(seed)`` (see the module)."""

    def __init__(self, seed: int, library: ctypes.CDLL | None = None) -> None:
        lib = library if library is not None else _loaded()[0]
        if lib is None:
            raise RuntimeError(f"native normal kernel unavailable: {status()}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**64)")
        self._lib = lib
        self._state = ctypes.create_string_buffer(lib.adre_mt19937_bytes())
        lib.adre_mt19937_seed(self._state, seed)

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (contiguous float32 on CPU, >= 16 values) <- the stream's next ``out.numel()`` values."""
        if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out: must be a contiguous float32 CPU tensor, not {out.dtype} on {out.device} "
                             f"(contiguous={out.is_contiguous()})")
        if out.numel() < TORCH_CPU_NORMAL_CHUNK:
            raise ValueError(f"out.numel()={out.numel()}: must be >= {TORCH_CPU_NORMAL_CHUNK} (torch draws "
                             "fewer another way)")
        self._lib.adre_normal_fill(self._state, out.data_ptr(), out.numel())
        return out


def available() -> bool:
    """Whether ``TorchCpuNormal`` can be used here (built, loaded, and equal to torch on the probe)."""
    return _loaded()[0] is not None


def status() -> str:
    """Which CPU normal the sampler draws with, and why (for logs and benchmarks)."""
    return _loaded()[1]


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    """(the checked kernel or None, what the sampler draws with and why), found once and logged."""
    reason = _unsupported()
    lib = None
    if reason is None:
        try:
            lib = _load(_built())
        except (OSError, subprocess.SubprocessError, RuntimeError) as error:
            reason = f"not built ({error})"
    if lib is not None and not _agrees(lib):
        lib, reason = None, "built, but its values differ from torch.randn's here"
    status = "native kernel (torch_cpu_normal.cpp): torch.randn's values" if lib is not None else \
        f"torch.randn ({reason})"
    log.info("CPU noise: %s", status)
    return lib, status


def _unsupported() -> str | None:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"machine {platform.machine()}: the kernel is x86-64 (AVX2)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in TORCH_KERNELS:
        return f"torch's CPU kernels are {capability}, not {' or '.join(TORCH_KERNELS)}"
    return None


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++, c++, clang++ or $CXX)")
    return compiler


def _built() -> Path:
    """The shared library, compiled once per (source, flags, torch, compiler) into the cache folder."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True,
                             timeout=COMPILE_TIMEOUT_S).stdout
    identity = hashlib.sha256("\0".join([SOURCE.read_text(), *COMPILE_FLAGS, torch.__version__, compiler,
                                         version]).encode()).hexdigest()[:16]
    folder = _cache_folder()
    target = folder / f"torch_cpu_normal-{identity}.so"
    if target.exists():
        return target
    partial = folder / f"{target.name}.{os.getpid()}.{threading.get_ident()}.partial"
    include = Path(torch.__file__).parent / "include"
    command = [compiler, *COMPILE_FLAGS, f"-I{include}", str(SOURCE), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()[-500:]}")
    os.replace(partial, target)  # atomic: actors building at once each install a whole file
    return target


def _cache_folder() -> Path:
    """``$ADRE_RAY_CACHE_DIR/native``, else ``~/.cache/adre-ray/native``, else one in the temp folder."""
    candidates = [Path(os.environ[CACHE_ENV]) / "native"] if os.environ.get(CACHE_ENV) else []
    with contextlib.suppress(RuntimeError):  # no home directory
        candidates.append(Path.home() / ".cache" / "adre-ray" / "native")
    candidates.append(Path(tempfile.gettempdir()) / f"adre-ray-{os.getuid()}" / "native")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise RuntimeError(f"no writable cache folder among {', '.join(map(str, candidates))}")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.adre_mt19937_bytes.restype = ctypes.c_int64
    lib.adre_mt19937_bytes.argtypes = []
    lib.adre_mt19937_seed.restype = None
    lib.adre_mt19937_seed.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.adre_normal_fill.restype = ctypes.c_int
    lib.adre_normal_fill.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def _agrees(lib: ctypes.CDLL) -> bool:
    """Whether the kernel gives torch.randn's values on the probe (``PROBE_SEEDS`` x ``PROBE_SIZES``)."""
    for seed in PROBE_SEEDS:
        ours, generator = TorchCpuNormal(seed, lib), torch.Generator().manual_seed(seed)
        for size in PROBE_SIZES:
            drawn = ours.fill_(torch.empty(size, device="cpu"))
            if not torch.equal(drawn, torch.randn(size, generator=generator, device="cpu")):
                return False
    return True


__all__ = ["TORCH_CPU_NORMAL_CHUNK", "TorchCpuNormal", "available", "status"]
