"""``adre-ray`` command line: one subcommand per job, each the same code as ``jobs/<name>.py``.

Every subcommand is ``main(argv) -> int`` in its module, so ``ray job submit -- python jobs/X.py ...``
and ``adre-ray X ...`` run the same thing. Modules are imported lazily so ``--help`` is fast.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("adre_ray.distributed.train", "train a base classifier as DDP under Ray Train"),
    "certify": ("adre_ray.distributed.certify", "PREDICT / CERTIFY / T-CERTIFY on Ray actors"),
    "tune": ("adre_ray.distributed.tune", "Ray Tune search over lambda / epsilon / sigma / k / lr"),
    "convert": ("adre_ray.distributed.convert", "ImageFolder tree -> Parquet shards, in parallel Ray tasks"),
    "analyze": ("adre_ray.analysis.report", "certified-accuracy tables and plots from results"),
    "demo": ("adre_ray.demo", "the end-to-end demo on one machine"),
    "import-checkpoint": ("adre_ray.import_cli",
                          "convert a randomized-smoothing / torchvision checkpoint (same logits)"),
}


HELP_PARSERS: dict[str, str] = {
    "certify": "certify_parser", "tune": "tune_parser", "import-checkpoint": "import_checkpoint_parser",
}
"""Commands whose modules import torch or Ray: for ``--help`` only their parser (``adre_ray.parsers``,
configs only) is built, so help is instant. The other commands' modules are light at import."""


def version() -> str:
    """The installed package's version (its metadata), else "unknown" (a source tree on PYTHONPATH)."""
    try:
        return importlib.metadata.version("adre-ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def usage() -> str:
    lines = ["usage: adre-ray [--version] COMMAND [options]   (adre-ray COMMAND --help for a command's "
             "options)", ""]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"adre-ray {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"adre-ray: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in HELP_PARSERS and any(arg in ("-h", "--help") for arg in rest):
        parsers = importlib.import_module("adre_ray.parsers")
        getattr(parsers, HELP_PARSERS[name])().parse_args(rest)  # prints the help: SystemExit(0), as main's
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
