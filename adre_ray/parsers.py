"""Argument parsers of the commands whose modules import torch or Ray, kept apart so that
``adre-ray <command> --help`` imports neither (``adre_ray.cli`` builds only the parser for ``--help``).

This module imports the configs and the standard library only; each command's ``main`` parses with the
same function, so the help shown is the parser used.
"""

from __future__ import annotations

import argparse

from adre_ray.config.base import DATASETS, IMPORT_FORMATS
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.flags import SuggestingParser, add_field_flags, config_reference
from adre_ray.config.train import TrainConfig
from adre_ray.config.tune import TuneSpace
from adre_ray.distributed._common import ADDRESS_HELP

CERTIFY_FLAG_NAMES: dict[str, str | tuple[str, ...]] = {"tcertify_mode": "--mode", "num_actors": "--actors"}
"""Flags whose name is not the field's kebab-case name (that name works too). Every other top-level
``CertifyConfig`` field gets ``--field-name`` automatically (``config.flags.add_field_flags``)."""


def certify_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="adre-ray certify",
        description="PREDICT / CERTIFY / T-CERTIFY of a checkpoint on Ray actors (results as Parquet). "
                    "Settings come from --config, then --set, then the field flags (the last word wins).")
    parser.add_argument("--config", help="YAML file with CertifyConfig fields (default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (YAML value), repeatable (default: none)")
    add_field_flags(parser, CertifyConfig, CERTIFY_FLAG_NAMES)
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    return parser


def tune_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="adre-ray tune", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="space file keys (--space FILE):\n" + config_reference(TuneSpace)
               + "\n\ntrain config keys (--config FILE, --set KEY=VALUE):\n" + config_reference(TrainConfig),
        description="Ray Tune search over TrainConfig keys (lambda, epsilon, sigma, k, lr, ...): each trial "
                    "a Ray Train run, ASHA early stopping, ranked by approximate certified accuracy, tracked "
                    "in MLflow (parent run + one child run per trial).")
    parser.add_argument("--space", required=True,
                        help="search space YAML (see tune_spaces/ and docs/tune.md; required)")
    parser.add_argument("--config", help="train config YAML (TrainConfig fields) every trial starts "
                                         "from (default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train config field for every trial, e.g. schedule.epochs=30 "
                             "(default: none)")
    parser.add_argument("--num-samples", default=None, metavar="N",
                        help="override the space's num_samples (default: the space's)")
    parser.add_argument("--max-concurrent", default=None, metavar="N",
                        help="trials at once (default: the space's max_concurrent, else as resources allow)")
    parser.add_argument("--name", default=None,
                        help="override the search name (output subfolder, MLflow run name; default: the "
                             "space's)")
    parser.add_argument("--output-dir", default=None, help="override the space's output_dir (default: the "
                                                           "space's)")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    return parser


def import_checkpoint_parser() -> argparse.ArgumentParser:
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


__all__ = ["CERTIFY_FLAG_NAMES", "certify_parser", "import_checkpoint_parser", "tune_parser"]
