"""Counter-based Gaussian noise: each value depends only on (key, position), never on a launch shape.

``philox_normal(key, start, count)`` returns the values at positions start, ..., start + count - 1 of
the stream of ``key`` (a 63-bit seed, ``adre_ray.smoothing.sampler.noise_seed``). Position p belongs to
the pair q = p // 2: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3")
encrypts the 128-bit counter (q mod 2**32, q // 2**32, 0, 0) under the 64-bit key into four 32-bit
words; words (0, 1) and (2, 3) each give a 52-bit integer k and the uniform u = (2k + 1) / 2**53 in
(0, 1), exactly; Box-Muller turns (u1, u2) into z0 = r cos(2 pi u2), z1 = r sin(2 pi u2) with
r = sqrt(-2 log u1), which are independent N(0, 1) (|z| <= 8.57: a truncation of probability ~1e-17 per
value). Value 2q is z0, value 2q + 1 is z1, rounded to float32.

So the values of a shard do not depend on how they are cut into blocks or batches, on the number of
SMs or on the GPU model (the integer steps are exact, and every floating-point step is one correctly
scaled operation, with log, sqrt, sin and cos from the device's math library). Written in plain torch
int64 ops (products of two 32-bit words wrap modulo 2**64, whose low 64 bits are the exact product), so
it runs, and is tested, on CPU too; on CUDA it is the sampler's default generator
(``adre_ray.smoothing.sampler``), on CPU torch's own generator is (about 20x faster there, and its
values are already independent of the launch).
"""

from __future__ import annotations

import math

import torch

PHILOX_ROUNDS = 10
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_BUMPS = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def round_keys(key: int, rounds: int = PHILOX_ROUNDS) -> list[tuple[int, int]]:
    """The (k0, k1) 32-bit key words of each Philox round for the 64-bit ``key`` (Weyl-sequence bumps)."""
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    keys = []
    for _ in range(rounds):
        keys.append((k0, k1))
        k0, k1 = (k0 + _KEY_BUMPS[0]) & _MASK32, (k1 + _KEY_BUMPS[1]) & _MASK32
    return keys


def _philox_rounds(counter: tuple[torch.Tensor | int, ...], keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32 rounds on the four counter words (int64, values < 2**32) with ``keys`` (rounds, 2)."""
    c0, c1, c2, c3 = counter
    for r in range(keys.shape[0]):
        product0 = c0 * _MULTIPLIERS[0]
        product1 = c2 * _MULTIPLIERS[1]
        c0, c1, c2, c3 = (((product1 >> 32) & _MASK32) ^ c1 ^ keys[r, 0], product1 & _MASK32,
                          ((product0 >> 32) & _MASK32) ^ c3 ^ keys[r, 1], product0 & _MASK32)
    return c0, c1, c2, c3  # type: ignore[return-value]


def philox4x32(counter: tuple[torch.Tensor | int, ...], key: int,
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32-``rounds`` of the four 32-bit counter words (int64 tensors or ints, values < 2**32)
    under the 64-bit ``key``: four int64 tensors of 32-bit words (Random123's known-answer values)."""
    device = next((c.device for c in counter if isinstance(c, torch.Tensor)), torch.device("cpu"))
    keys = torch.tensor(round_keys(key, rounds), dtype=torch.int64, device=device)
    return _philox_rounds(counter, keys)


def _open_unit(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(2k + 1) / 2**53 in float64 for the 52-bit k = high's 32 bits and low's top 20 bits: in (0, 1)."""
    k = (high << 20) | (low >> 12)
    return (2 * k + 1).to(torch.float64) * 2.0**-53


def _pair_normals(pairs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """N(0, 1) values 2q and 2q + 1 for each pair index q in ``pairs`` (int64), interleaved (float32)."""
    w0, w1, w2, w3 = _philox_rounds((pairs & _MASK32, pairs >> 32, 0, 0), keys)
    radius = torch.sqrt(-2.0 * torch.log(_open_unit(w0, w1)))
    angle = (2.0 * math.pi) * _open_unit(w2, w3)
    return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1).flatten().float()


_compiled_pair_normals: object = None


def _fused_pair_normals(pairs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``_pair_normals`` as one fused kernel (``torch.compile``, dynamic sizes) on CUDA: bitwise the same
    values (exact integer steps; each float step a single rounding that no fusion changes). Falls back to
    the eager ops, with a warning, if compilation fails (no triton, no compiler)."""
    global _compiled_pair_normals
    if pairs.device.type != "cuda" or _compiled_pair_normals is False:
        return _pair_normals(pairs, keys)
    try:
        if _compiled_pair_normals is None:
            _compiled_pair_normals = torch.compile(_pair_normals, dynamic=True)
        return _compiled_pair_normals(pairs, keys)  # type: ignore[operator]
    except Exception as err:  # noqa: BLE001 - speed only: the eager ops give the same values
        import warnings

        warnings.warn(f"philox noise: torch.compile failed ({type(err).__name__}: {err}); using eager ops "
                      "(same values, slower)", RuntimeWarning, stacklevel=2)
        _compiled_pair_normals = False
        return _pair_normals(pairs, keys)


def philox_normal(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``count`` N(0, 1) values (float32, 1-D, on ``device``) at positions start, ..., start + count - 1
    of the stream of ``key`` (see the module docstring: each value is a function of (key, position))."""
    if start < 0 or count < 0:
        raise ValueError(f"start={start}, count={count}: must be >= 0")
    first_pair, last_pair = start // 2, (start + count + 1) // 2
    device = torch.device(device)
    pairs = torch.arange(first_pair, last_pair, dtype=torch.int64, device=device)
    keys = torch.tensor(round_keys(int(key)), dtype=torch.int64, device=device)
    values = _fused_pair_normals(pairs, keys)
    offset = start - 2 * first_pair
    return values[offset:offset + count]


def philox_normal_(out: torch.Tensor, key: int, start: int) -> torch.Tensor:
    """Fill the contiguous float32 ``out`` with ``philox_normal(key, start, out.numel())`` (in C order)."""
    out.view(-1).copy_(philox_normal(key, start, out.numel(), out.device))
    return out


__all__ = ["PHILOX_ROUNDS", "philox4x32", "philox_normal", "philox_normal_", "round_keys"]
