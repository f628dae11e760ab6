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

from adre_ray.config.base import DATASETS
from adre_ray.models.importers import IMPORT_FORMATS, import_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adre-ray import-checkpoint",
        description="Convert a randomized-smoothing or torchvision checkpoint into an adre-ray checkpoint "
                    "(same logits; read with torch.load(weights_only=True), so no code in it runs).")
    parser.add_argument("source", metavar="SRC", help="checkpoint file to import")
    parser.add_argument("--format", dest="source_format", required=True, choices=IMPORT_FORMATS,
                        help="smoothing: {arch, state_dict, epoch, optimizer} of the original randomized-"
                             "smoothing code (Cohen, SmoothAdv, MACER, ...); torchvision: a plain state dict")
    parser.add_argument("--dataset", default=None, choices=DATASETS,
                        help="dataset the model was trained on (required unless --model-fn)")
    parser.add_argument("--model-fn", default=None, metavar="MODULE:FUNCTION",
                        help="(--format smoothing) a function returning the whole module (normalization "
                             "included, on inputs in the data's space) into which the state dict loads "
                             "strictly; importable from the working directory, PYTHONPATH or installed")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="with --model-fn: the class count (default: read from the model's output)")
    parser.add_argument("--output", required=True, help="adre-ray checkpoint to write (file, or folder for "
                                                        "model.pt); never overwritten")
    parser.add_argument("--sigma", type=float, default=None,
                        help="training noise level, recorded so certify defaults to it and warns on another")
    parser.add_argument("--arch", default="resnet50",
                        help="architecture of a torchvision state dict (default resnet50; smoothing files "
                             "name their own)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adre-ray import-checkpoint`` and ``jobs/import_checkpoint.py``."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        path = import_checkpoint(args.source, args.output, source_format=args.source_format,
                                 dataset=args.dataset, arch=args.arch, sigma=args.sigma,
                                 model_fn=args.model_fn, num_classes=args.num_classes)
    except ValueError as err:
        print(f"adre-ray import-checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
