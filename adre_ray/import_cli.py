"""``adre-ray import-checkpoint``: convert another code's checkpoint into an adre-ray checkpoint.

    adre-ray import-checkpoint SRC --format smoothing|torchvision --dataset cifar10|imagenet --output DST
                               [--sigma SIGMA] [--arch resnet50]
    adre-ray import-checkpoint SRC --format smoothing --model-fn MODULE:FUNCTION --output DST
                               [--sigma SIGMA] [--num-classes K]

The written checkpoint gives the logits of the source model on [0, 1] images (its own normalization is
stored in the file) and is certified like any other: ``adre-ray certify --checkpoint DST``.
Exit status 0, or 2 on bad input (the message names it; nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from adre_ray.models.importers import import_checkpoint
from adre_ray.parsers import import_checkpoint_parser
from adre_ray.smoothing.params import check_sigma

build_parser = import_checkpoint_parser


def check_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` naming the value before anything is read or written: ``--sigma`` not a finite number
    in (0, MAX_SIGMA] (inf and nan included), or an ``--output`` below a regular file (no folder can be
    made there)."""
    if args.sigma is not None:
        check_sigma(args.sigma, "--sigma")
    existing = Path(args.output).expanduser().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"--output={args.output!r}: {str(existing)!r} is a file, so nothing can be written "
                         "below it")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adre-ray import-checkpoint`` and ``jobs/import_checkpoint.py``."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        check_arguments(args)
        path = import_checkpoint(args.source, args.output, source_format=args.source_format,
                                 dataset=args.dataset, arch=args.arch, sigma=args.sigma,
                                 model_fn=args.model_fn, num_classes=args.num_classes)
    except ValueError as err:
        print(f"adre-ray import-checkpoint: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. no space left, permission denied while writing
        print(f"adre-ray import-checkpoint: error: cannot write {args.output!r}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
