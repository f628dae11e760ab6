"""--help generated from the config fields, --version, suggestions for near-miss commands and options."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import typing
from dataclasses import dataclass

import pytest

from adre_ray import cli
from adre_ray.config import config_field, field_help
from adre_ray.config.base import JobConfig
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.demo import DemoConfig
from adre_ray.config.flags import SuggestingParser, add_field_flags, flag_values, scalar_fields
from adre_ray.config.train import TrainConfig
from adre_ray.config.tune import TuneSpace
from adre_ray.distributed import certify as certify_job

CONFIGS = [CertifyConfig, TrainConfig, TuneSpace, DemoConfig]


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_a_meaning(cls):
    def walk(c):
        hints = typing.get_type_hints(c)
        yield from ((c, f.name) for f in scalar_fields(c))
        for f in dataclasses.fields(c):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name])

    missing = [f"{c.__name__}.{name}" for c, name in walk(cls) if not field_help(c, name)]
    assert not missing


def test_certify_help_shows_meaning_and_default_of_every_option(capsys):
    parser = certify_job.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {f.name for f in dataclasses.fields(CertifyConfig)}
    for action in options:
        assert "(default: " in (action.help or ""), action.option_strings
    text = re.sub(r"\s+", " ", _help("certify", capsys))
    squeezed = re.sub(r"\s+", "", text)  # argparse wraps lines, also after hyphens
    for f in dataclasses.fields(CertifyConfig):
        assert re.sub(r"\s+", "", field_help(CertifyConfig, f.name)) in squeezed, f.name
    assert "(default: 100000)" in text and "(default: pilot)" in text and "(default: null)" in text
    # the names users already know stay
    for flag in ("--mode", "--actors", "--grid", "--no-progress", "--checkpoint", "--n0", "--output-dir"):
        assert flag in text


@pytest.mark.parametrize("command, cls, sample", [
    ("train", TrainConfig, "loss.lam"), ("tune", TuneSpace, "scheduler.grace_period"),
    ("demo", DemoConfig, "--cert-batch-size"),
])
def test_other_commands_list_their_fields(capsys, command, cls, sample):
    text = re.sub(r"\s+", " ", _help(command, capsys))
    assert sample in text and "(default: " in text
    first = field_help(cls, scalar_fields(cls)[0].name)
    assert re.sub(r"\s+", "", first) in re.sub(r"\s+", "", text)


def test_a_new_field_gets_its_flag_for_free():
    @dataclass
    class Extended(JobConfig):
        early_abstain: bool = config_field(False, "stop an image's draws once it must abstain")
        max_n: int = config_field(100_000, "largest per-image n")

    parser = SuggestingParser(prog="x")
    add_field_flags(parser, Extended)
    args = parser.parse_args(["--early-abstain", "--max-n", "1e6"])
    assert flag_values(args, Extended) == {"early_abstain": True, "max_n": "1e6"}
    assert Extended.from_dict(flag_values(args, Extended)) == Extended(True, 1_000_000)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"adre-ray {importlib.metadata.version('adre-ray')}"


def test_near_miss_command_and_option_are_suggested(capsys):
    assert cli.main(["certfy"]) == 2
    assert "did you mean 'certify'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        certify_job.config_from_args(["--chekpoint", "m.pt"])
    assert info.value.code == 2
    assert "did you mean --checkpoint?" in capsys.readouterr().err


def test_tune_flags_take_numbers_as_typed(tmp_path):
    from adre_ray.config.tune import load_space
    from adre_ray.distributed.tune import build_parser

    space = tmp_path / "space.yaml"
    space.write_text("search:\n  loss.lam: {grid: [0.1, 0.2]}\nvalidation:\n  enabled: false\n"
                     "metric: test_acc_noise\n")
    args = build_parser().parse_args(["--space", str(space), "--num-samples", "1e2", "--max-concurrent", "2"])
    loaded = load_space(args.space, {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent})
    assert (loaded.num_samples, loaded.max_concurrent) == (100, 2)


def test_demo_flags_take_numbers_as_typed():
    from adre_ray.config import load_config
    from adre_ray.demo import build_parser

    args = build_parser().parse_args(["--lr", "1E-5", "--n", "100_000", "--output-dir", "x"])
    cfg = load_config(DemoConfig, None, values=flag_values(args, DemoConfig))
    assert (cfg.lr, cfg.n, cfg.output_dir) == (pytest.approx(1e-5), 100_000, "x")
