"""Seeds of a distributed training: every random draw is a function of (seed, epoch, rank, stream)."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A distinct non-negative seed per (seed, epoch >= -1, rank < 4096, stream in {0: train, 1: eval})."""
    return ((seed * 1_000_003 + epoch + 1) * 4_096 + rank) * 2 + stream


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """torch / numpy / random RNGs of rank ``rank`` in ``epoch``, as a function of (seed, epoch, rank)
    (epoch -1, rank 0: the initial weights, identical on every rank)."""
    value = rng_seed(seed, epoch, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


__all__ = ["rng_seed", "seed_everything"]
