"""MNIST IDX -> arrays ``.npz`` for ``adre-ray certify --dataset arrays`` (x in [0, 1], optionally pooled).

    python examples/levine2020/mnist_to_npz.py ../shared/data/mnist --split test --pool 4 \
        --output small_mnist_test.npz       # 1x7x7: 4x4 block means (Levine et al.'s small MNIST input)
    python examples/levine2020/mnist_to_npz.py ../shared/data/mnist --split test --output mnist_test.npz
                                            # 1x28x28: the images as they are

Reads ``<split-prefix>-images-idx3-ubyte[.gz]`` and ``-labels-idx1-ubyte[.gz]`` (prefix t10k for test,
train for train) and writes ``x`` (N, 1, S, S) float32 and ``y`` (N,) int64.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from adre_ray.data.mnist import mnist_arrays

PREFIX = {"test": "t10k", "train": "train"}


def idx_file(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise ValueError(f"mnist_dir={str(folder)!r}: no {name}[.gz]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_dir", type=Path, help="folder of the IDX files")
    parser.add_argument("--split", choices=tuple(PREFIX), default="test")
    parser.add_argument("--pool", type=int, default=1, help="mean-pool over pool x pool blocks (4: 7x7)")
    parser.add_argument("--output", type=Path, required=True, help=".npz file to write (never overwritten)")
    args = parser.parse_args(argv)
    try:
        if args.output.exists():
            raise ValueError(f"output={str(args.output)!r}: already exists")
        prefix = PREFIX[args.split]
        x, y = mnist_arrays(idx_file(args.mnist_dir, f"{prefix}-images-idx3-ubyte"),
                            idx_file(args.mnist_dir, f"{prefix}-labels-idx1-ubyte"), pool=args.pool)
    except ValueError as err:
        print(f"mnist_to_npz: error: {err}", file=sys.stderr)
        return 2
    np.savez(args.output, x=x, y=y)
    print(f"wrote {args.output}: x {x.shape} {x.dtype}, y {y.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
