"""The native CPU normal kernel gives torch.randn's values, call after call, and is used only then."""

from __future__ import annotations

import ctypes
import platform
import shutil

import numpy as np
import pytest
import torch

from adre_ray.smoothing import sample_counts, torch_cpu_normal
from adre_ray.smoothing.sampler import _noise_batches, _noise_filler

SUPPORTED = platform.machine().lower() in ("x86_64", "amd64") and \
    torch.backends.cpu.get_cpu_capability() in torch_cpu_normal.TORCH_KERNELS and \
    any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.fixture
def kernel() -> None:
    if not torch_cpu_normal.available():
        pytest.skip(f"no native kernel here: {torch_cpu_normal.status()}")


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """``_loaded`` loads again under the test's settings (cache folder in tmp_path), and again after."""
    monkeypatch.setenv(torch_cpu_normal.CACHE_ENV, str(tmp_path))
    torch_cpu_normal._loaded.cache_clear()
    yield
    torch_cpu_normal._loaded.cache_clear()


def test_available_where_torch_runs_avx2_kernels_and_a_compiler_exists() -> None:
    if not SUPPORTED:
        pytest.skip("not x86-64 with torch's AVX2/AVX-512 kernels and a C++ compiler")
    assert torch_cpu_normal.available(), torch_cpu_normal.status()
    assert torch_cpu_normal.status().startswith("native kernel")


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 7, 2**62 + 12345, 2**64 - 1, 8_472_361_095_113])
def test_stream_equals_torch_randn_call_after_call(seed: int) -> None:
    sizes = [16, 17, 31, 48, 624, 625, 1000, 49 * 8192, 3 * 32 * 32 * 7 + 5, 16 * 39]
    ours, generator = torch_cpu_normal.TorchCpuNormal(seed), torch.Generator().manual_seed(seed)
    for size in sizes:
        got = ours.fill_(torch.empty(size))
        expected = torch.randn(size, generator=generator)
        assert torch.equal(got, expected), f"seed {seed}, size {size}: {(got != expected).sum()} differ"


@pytest.mark.usefixtures("kernel")
def test_many_random_seeds_and_sizes_equal_torch() -> None:
    rng = np.random.default_rng(2026)
    for _ in range(100):
        seed = int(rng.integers(0, 2**63))
        ours, generator = torch_cpu_normal.TorchCpuNormal(seed), torch.Generator().manual_seed(seed)
        for size in map(int, rng.integers(16, 3000, size=4)):
            assert torch.equal(ours.fill_(torch.empty(size)), torch.randn(size, generator=generator))


@pytest.mark.usefixtures("kernel")
def test_fill_refuses_what_torch_draws_another_way() -> None:
    ours = torch_cpu_normal.TorchCpuNormal(0)
    with pytest.raises(ValueError, match="out.numel\\(\\)=15"):
        ours.fill_(torch.empty(15))
    with pytest.raises(ValueError, match="float64"):
        ours.fill_(torch.empty(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous=False"):
        ours.fill_(torch.empty(32, 2)[:, 0])
    for seed in (-1, 2**64, True, 1.0):
        with pytest.raises(ValueError, match="seed="):
            torch_cpu_normal.TorchCpuNormal(seed)  # type: ignore[arg-type]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("shape", "batch", "num"), [((1, 7, 7), 8192, 20_001), ((16,), 4, 37),
                                                     ((3, 4, 4), 32, 1001), ((3, 32, 32), 256, 2100)])
def test_sampler_draws_natively_with_torch_values(shape: tuple[int, ...], batch: int, num: int) -> None:
    key = 987_654_321_012
    native = _noise_filler("torch", key, torch.device("cpu"), shape)
    plain = _noise_filler("torch", key, torch.device("cpu"))  # no sample shape: torch's generator
    assert native.__name__ == "fill_native" and plain.__name__ == "fill_torch"
    for in_batches in (False, True):
        drawn = [torch.cat([b.clone() for b in _noise_batches(torch.zeros(shape), num, 1.0, batch, fill,
                                                              False, in_batches=in_batches)])
                 for fill in (native, plain)]
        assert torch.equal(*drawn)


def test_samples_of_fewer_than_16_values_use_torchs_generator() -> None:
    assert _noise_filler("torch", 5, torch.device("cpu"), (15,)).__name__ == "fill_torch"
    assert _noise_filler("philox", 5, torch.device("cpu"), (1, 7, 7)).__name__ == "fill_philox"


@pytest.mark.usefixtures("kernel")
def test_counts_identical_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(49, 10)).eval()
    x = torch.rand(1, 7, 7)
    native = sample_counts(model, x, 5000, 10, 0.5, batch_size=512, seed=3, idx=4)
    monkeypatch.setattr(torch_cpu_normal, "available", lambda: False)
    plain = sample_counts(model, x, 5000, 10, 0.5, batch_size=512, seed=3, idx=4)
    assert native.tolist() == plain.tolist() and len(set(native.tolist())) > 2  # the noise moves the counts


@pytest.mark.usefixtures("fresh_load")
def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(torch_cpu_normal.DISABLE_ENV, "0")
    assert not torch_cpu_normal.available()
    assert torch_cpu_normal.status() == f"torch.randn ({torch_cpu_normal.DISABLE_ENV}=0)"
    assert _noise_filler("torch", 5, torch.device("cpu"), (1, 7, 7)).__name__ == "fill_torch"


@pytest.mark.usefixtures("fresh_load")
def test_a_failing_compiler_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    if not SUPPORTED:
        pytest.skip("the kernel is not built on this machine anyway")
    fails = tmp_path / "cxx"
    fails.write_text("#!/bin/sh\necho 'no such flag' >&2\nexit 1\n")
    fails.chmod(0o755)
    monkeypatch.setenv("CXX", str(fails))
    assert not torch_cpu_normal.available()
    assert torch_cpu_normal.status().startswith("torch.randn (not built (")


@pytest.mark.usefixtures("fresh_load")
def test_built_once_then_taken_from_the_cache(tmp_path) -> None:
    if not SUPPORTED:
        pytest.skip("the kernel is not built on this machine")
    first = torch_cpu_normal._built()
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "native" and torch_cpu_normal._built() == first
    assert first.stat().st_mtime_ns == stamp and not list(first.parent.glob("*.partial"))


class ZeroKernel:
    """A kernel with the right interface whose values are all 0: the probe must refuse it."""

    def adre_mt19937_bytes(self) -> int:
        return 8

    def adre_mt19937_seed(self, state: object, seed: int) -> None:
        pass

    def adre_normal_fill(self, state: object, pointer: int, count: int) -> int:
        ctypes.memset(pointer, 0, 4 * count)
        return 0


def test_probe_refuses_a_kernel_with_other_values() -> None:
    assert not torch_cpu_normal._agrees(ZeroKernel())  # type: ignore[arg-type]


@pytest.mark.usefixtures("fresh_load", "kernel")
def test_kernel_with_other_values_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    torch_cpu_normal._loaded.cache_clear()
    monkeypatch.setattr(torch_cpu_normal, "_agrees", lambda lib: False)
    assert not torch_cpu_normal.available()
    assert torch_cpu_normal.status() == "torch.randn (built, but its values differ from torch.randn's here)"


def test_cache_folder_falls_back_when_the_configured_one_is_unusable(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path) -> None:
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(torch_cpu_normal.CACHE_ENV, str(blocked))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert torch_cpu_normal._cache_folder() == tmp_path / "home" / ".cache" / "adre-ray" / "native"
