"""``adre-ray analyze``: certified-accuracy tables and plots from certification results, logged to MLflow.

    adre-ray analyze RESULT [RESULT ...] [--label NAME ...] [--sigma S ...] --output-dir DIR [--radii R ...]
                     [--plot-method certify|tcertify|both] [--log-mlflow | --no-log-mlflow]
                     [--experiment NAME] [--tracking-uri URI]

RESULT is a Parquet file, a result folder (``part-*.parquet``, as the certification job writes), a
published certification log of the original randomized-smoothing code (tab-separated, header
``idx label predict radius correct time``; read as CERTIFY rows, see ``published_logs``), or an
MLflow run, ``mlflow:<run_id>`` or ``runs:/<run_id>[/<artifact path>]``, whose Parquet artifacts (under
``results`` unless a path is given) are downloaded to a temporary folder. Writes into DIR only:
``table.md``, ``table.csv`` (Table 1 layout, one row per run and method), ``certified_accuracy.png``
(Figure 1), ``certify_vs_tcertify_<run>.png`` (Figure 2, one per run) and ``summary.json`` (every
``metrics.summarize`` value per run). Exit status 0, or 2 on bad input (the message names it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from adre_ray.analysis.metrics import METHODS, check_radii, methods_present, mlflow_metrics, summarize
from adre_ray.analysis.result_sources import (  # noqa: F401  (RESULT reading; re-exported)
    RESULTS_ARTIFACT_PATH,
    LoadedResult,
    apply_sigmas,
    load_result,
    parse_run_spec,
    read_result_path,
)
from adre_ray.analysis.tables import (
    METHOD_CHOICES,
    TABLE_RADII,
    certified_accuracy_table,
    to_csv,
    to_markdown,
)
from adre_ray.config.flags import SuggestingParser
from adre_ray.tracking import (
    DISABLED,
    log_artifact,
    log_config,
    log_metrics,
    mlflow_run,
    resolve_tracking_uri,
    set_tags,
)

ANALYSIS_ARTIFACT_PATH = "analysis"
"""Artifact folder under which ``analyze`` logs its outputs."""

DEFAULT_EXPERIMENT = "adre-ray-analysis"


def unique_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` with repeats made distinct by a suffix: ``a, a, b`` -> ``a, a-2, b``."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


def file_safe(label: str) -> str:
    """``label`` reduced to characters safe in a file name (others become '_')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def metric_safe(label: str) -> str:
    """``label`` reduced to characters MLflow accepts in a metric name."""
    return re.sub(r"[^\w.\- ]+", "_", label).strip("_") or "run"


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="adre-ray analyze",
        description="Certified-accuracy tables (Table 1) and plots (Figures 1-2) from certification results.")
    parser.add_argument("results", nargs="+", metavar="RESULT",
                        help="Parquet file or folder (local, s3://, gs://, file://), a published "
                             "certification log (idx label predict radius correct time), or "
                             "mlflow:<run_id> / runs:/<run_id>[/<artifact path>]")
    parser.add_argument("--label", action="append", default=None, metavar="NAME",
                        help="name of each RESULT in tables and plots (give once per RESULT, in order; "
                             "default: the folder or run name)")
    parser.add_argument("--sigma", action="append", type=float, default=None, metavar="S",
                        help="noise level of the published logs, for the table's sigma column: once for "
                             "all RESULTs or once per RESULT in order (a Parquet RESULT's must equal its "
                             "recorded sigma; default: none)")
    parser.add_argument("--output-dir", required=True, type=Path,
                        help="folder for every output (created; required)")
    parser.add_argument("--radii", nargs="+", type=float, default=list(TABLE_RADII), metavar="R",
                        help="table columns (default: 0 0.25 ... 3.0)")
    parser.add_argument("--plot-method", choices=METHOD_CHOICES, default="certify",
                        help="certification method(s) in certified_accuracy.png (default: certify)")
    parser.add_argument("--log-mlflow", action=argparse.BooleanOptionalAction, default=None,
                        help="log outputs to MLflow (default: on when a tracking URI is given or set in "
                             "MLFLOW_TRACKING_URI, or a RESULT is an MLflow run)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help=f"MLflow experiment of the analysis run (default: {DEFAULT_EXPERIMENT})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    return parser


def write_outputs(results: Sequence[LoadedResult], labels: Sequence[str], output_dir: Path,
                  radii: Sequence[float], plot_method: str) -> tuple[str, dict[str, dict[str, float]]]:
    """Write table.md, table.csv, summary.json and the plots into ``output_dir``; returns (Markdown table,
    summaries by label)."""
    runs = {label: r.table for label, r in zip(labels, results, strict=True)}
    rows = certified_accuracy_table(runs, radii=radii, method="both")
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, output_dir / "table.md")
    to_csv(rows, output_dir / "table.csv")
    from adre_ray.analysis.plots import (  # matplotlib: not for --help
        plot_certified_accuracy,
        plot_certify_vs_tcertify,
    )

    plot_certified_accuracy(runs, output_dir / "certified_accuracy.png", method=plot_method)
    for label, table in runs.items():
        if set(methods_present(table)) == set(METHODS):  # a published log has no T-CERTIFY to compare
            plot_certify_vs_tcertify(table, output_dir / f"certify_vs_tcertify_{file_safe(label)}.png")
    summaries = {label: summarize(table, radii) for label, table in runs.items()}
    record = {label: {"source": r.spec, "kind": r.kind, "run_id": r.run_id, "metrics": summaries[label]}
              for label, r in zip(labels, results, strict=True)}
    (output_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return markdown, summaries


def log_outputs(results: Sequence[LoadedResult], labels: Sequence[str],
                summaries: dict[str, dict[str, float]], output_dir: Path, experiment: str,
                tracking_uri: str) -> str:
    """Log ``output_dir`` and the summaries to MLflow; returns the run id logged to.

    One MLflow RESULT: into that run (artifacts under ``analysis/``, metrics unprefixed). Otherwise a new
    run in ``experiment`` named ``analyze``, with metrics prefixed by each label when there are several.
    """
    if len(results) == 1 and results[0].run_id:
        run_id = results[0].run_id
        log_artifact(output_dir, ANALYSIS_ARTIFACT_PATH, run_id=run_id, tracking_uri=tracking_uri)
        log_metrics(mlflow_metrics(summaries[labels[0]]), run_id=run_id, tracking_uri=tracking_uri)
        return run_id
    tags = {"adre_ray.job": "analyze"}
    with mlflow_run(experiment, "analyze", tracking_uri=tracking_uri, tags=tags) as run:
        run_id = run.info.run_id
        log_config({"results": [r.spec for r in results], "labels": list(labels)}, run_id=run_id,
                   tracking_uri=tracking_uri)
        source_runs = [r.run_id for r in results if r.run_id]
        if source_runs:
            set_tags({"adre_ray.source_runs": ",".join(source_runs)}, run_id=run_id,
                     tracking_uri=tracking_uri)
        metrics: dict[str, float] = {}
        for label, summary in summaries.items():
            prefix = f"{metric_safe(label)}/" if len(summaries) > 1 else ""
            metrics.update(mlflow_metrics(summary, prefix=prefix))
        log_metrics(metrics, run_id=run_id, tracking_uri=tracking_uri)
        log_artifact(output_dir, ANALYSIS_ARTIFACT_PATH, run_id=run_id, tracking_uri=tracking_uri)
    return run_id


def run_analysis(args: argparse.Namespace) -> str:
    """Read every RESULT, write the outputs, log them if asked; returns the Markdown table."""
    radii = [float(r) for r in check_radii(args.radii)]
    if args.label is not None and len(args.label) != len(args.results):
        raise ValueError(f"--label given {len(args.label)} time(s) for {len(args.results)} RESULT(s): "
                         "give one label per RESULT or none")
    sigmas = getattr(args, "sigma", None)
    if sigmas is not None and len(sigmas) not in (1, len(args.results)):
        raise ValueError(f"--sigma given {len(sigmas)} time(s) for {len(args.results)} RESULT(s): give it "
                         "once (for every RESULT) or once per RESULT")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"output_dir={str(args.output_dir)!r}: exists and is not a directory")
    from_run = any(parse_run_spec(spec) for spec in args.results)
    uri_given = bool(args.tracking_uri) or bool(os.environ.get("MLFLOW_TRACKING_URI"))
    tracking_uri = resolve_tracking_uri(args.tracking_uri) if (from_run or uri_given or args.log_mlflow) \
        else DISABLED
    with tempfile.TemporaryDirectory(prefix="adre-ray-analyze-") as download_dir:
        results = [load_result(spec, tracking_uri=tracking_uri, download_dir=Path(download_dir))
                   for spec in args.results]
    results = apply_sigmas(results, getattr(args, "sigma", None))
    labels = unique_labels(args.label if args.label is not None else [r.default_label for r in results])
    for label, result in zip(labels, results, strict=True):
        skipped = (f" (not read: MLflow artifact copies in {', '.join(result.skipped)})"
                   if result.skipped else "")
        print(f"adre-ray analyze: {label}: read {result.table.num_rows} rows from {', '.join(result.sources)}"
              + skipped, file=sys.stderr)
    markdown, summaries = write_outputs(results, labels, args.output_dir, radii, args.plot_method)
    log = args.log_mlflow if args.log_mlflow is not None else (from_run or uri_given)
    if log and tracking_uri != DISABLED:
        run_id = log_outputs(results, labels, summaries, args.output_dir, args.experiment, tracking_uri)
        print(f"logged to MLflow run {run_id} ({tracking_uri})", file=sys.stderr)
    return markdown


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``adre-ray analyze`` and ``jobs/analyze.py``; 0 on success, 2 on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        markdown = run_analysis(args)
    except ValueError as err:
        print(f"adre-ray analyze: error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"outputs written to {args.output_dir}", file=sys.stderr)
    return 0

