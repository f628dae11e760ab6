"""Counter-based noise (adre_ray.smoothing.noise): Philox4x32-10, each value a function of (key, position),
so the sampler's noise does not depend on how a shard is cut into blocks and batches (the GPU launch-shape
bug of torch's CUDA ``randn``), checked on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from adre_ray.smoothing import (
    NOISE_SCHEME,
    PHILOX_NOISE_SCHEME,
    default_noise,
    noise_scheme,
    noise_seed,
    sample_counts,
)
from adre_ray.smoothing import sampler as sampler_module
from adre_ray.smoothing.noise import philox4x32, philox_normal

# Random123's kat_vectors: counter (4 words), key (2 words) -> output (4 words)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c]) for c in counter), key[0] | key[1] << 32)
    assert tuple(int(w) for w in words) == expected


def _reference_philox(counter: tuple[int, ...], key: int) -> tuple[int, ...]:
    """Philox4x32-10 on Python integers (no torch, no wrap-around tricks)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _reference_normal(key: int, position: int) -> float:
    """Value ``position`` of the stream of ``key``, as the module docstring defines it, in Python floats."""
    w = _reference_philox(((position // 2) & 0xFFFFFFFF, (position // 2) >> 32, 0, 0), key)
    u1 = (2 * ((w[0] << 20) | (w[1] >> 12)) + 1) * 2.0**-53
    u2 = (2 * ((w[2] << 20) | (w[3] >> 12)) + 1) * 2.0**-53
    trig = math.cos if position % 2 == 0 else math.sin
    return math.sqrt(-2.0 * math.log(u1)) * trig(2.0 * math.pi * u2)


def test_values_follow_the_definition_at_any_position():
    """Positions past 2**32 pairs too (a counter's high word): the torch int64 ops equal exact arithmetic."""
    key = noise_seed(3, 17, 2, 1)
    for start in (0, 1, 7, 2**33 + 5, 2**40 - 3):
        got = philox_normal(key, start, 6)
        want = torch.tensor([_reference_normal(key, start + i) for i in range(6)], dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)  # float32 rounding of a float64 value


def test_values_do_not_depend_on_the_chunking():
    """The stream cut at any points (odd starts split a Box-Muller pair) gives the same values bitwise."""
    key = noise_seed(0, 5)
    whole = philox_normal(key, 0, 1001)
    for cuts in ((0, 1, 2, 3, 1001), (0, 333, 334, 999, 1001), (0, 500, 1001), (0, 17, 512, 513, 1001)):
        pieces = [philox_normal(key, a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert torch.equal(torch.cat(pieces), whole), cuts
    assert not torch.equal(philox_normal(noise_seed(0, 6), 0, 1001), whole)  # another key: other values


def test_values_are_standard_normal_and_pairs_independent():
    """KS test against N(0, 1) at level 1e-3 (fixed key: a deterministic check), and the Box-Muller pairs
    uncorrelated within 4 standard errors (1 / sqrt(pairs))."""
    values = philox_normal(noise_seed(1, 2, 3, 0), 0, 2**16).double()
    assert stats.kstest(values.numpy(), "norm").pvalue > 1e-3
    pairs = values.view(-1, 2)
    correlation = torch.corrcoef(pairs.T)[0, 1].item()
    assert abs(correlation) < 4 / math.sqrt(pairs.shape[0])


class Recorder(torch.nn.Module):
    """Answers class 0 and keeps every input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().contiguous().clone())
        return torch.zeros(x.shape[0], 3)


def _shard_noise(num: int, shape: tuple[int, ...], **options) -> torch.Tensor:
    model = Recorder()
    x = torch.zeros(shape)
    sample_counts(model, x, num, 3, 1.0, seed=4, idx=9, shard=2, stream=1, noise="philox", **options)
    return torch.cat(model.seen)


@pytest.mark.parametrize("shape", [(3, 4, 4), (1, 7, 7), (5,)])
def test_sampler_philox_noise_is_a_function_of_the_keys_and_position(shape, monkeypatch):
    """The sampler's philox noise equals philox_normal(noise_seed(...), position) for every batch size,
    padding, layout and noise-block size (a stand-in for the launch shapes of different GPUs)."""
    if len(shape) != 3:
        try:
            sample_counts(Recorder(), torch.zeros(shape), 1, 3, 1.0)
        except ValueError as err:
            if "x.shape" not in str(err):
                raise
            pytest.skip("this sampler takes (C, H, W) images only")
    num = 37
    numel = math.prod(shape)
    want = philox_normal(noise_seed(4, 9, 2, 1), 0, num * numel).view(num, *shape)
    for batch_size in (1, 4, 16, 1000):
        assert torch.equal(_shard_noise(num, shape, batch_size=batch_size), want), batch_size
    assert torch.equal(_shard_noise(num, shape, batch_size=8, pad_batches=True)[:num], want)
    for block_elements in (numel, 3 * numel, 2**12):
        monkeypatch.setattr(sampler_module, "NOISE_BLOCK_ELEMENTS", block_elements)
        assert torch.equal(_shard_noise(num, shape, batch_size=2), want), block_elements


def test_sampler_philox_counts_do_not_depend_on_the_batch_size():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4)).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model[1].weight)
    x = torch.rand(3, 4, 4)
    counts = [sample_counts(model, x, 300, 4, 0.5, batch_size=b, idx=1, noise="philox") for b in (7, 64, 512)]
    assert all(torch.equal(counts[0], c) for c in counts[1:]) and counts[0].sum() == 300
    assert not torch.equal(counts[0], sample_counts(model, x, 300, 4, 0.5, idx=1, noise="torch"))


def test_generator_defaults_and_schemes():
    assert default_noise("cpu") == "torch" and default_noise("cuda") == "philox"
    assert noise_scheme("torch") == NOISE_SCHEME
    assert noise_scheme("philox") == PHILOX_NOISE_SCHEME != NOISE_SCHEME
    with pytest.raises(ValueError, match="noise='mt'"):
        noise_scheme("mt")
    with pytest.raises(ValueError, match="noise='mt'"):
        sample_counts(Recorder(), torch.zeros(3, 4, 4), 4, 3, 1.0, noise="mt")
