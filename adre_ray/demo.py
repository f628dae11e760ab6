"""``adre-ray demo``: the whole pipeline on one machine, no server, no internet needed.

Trains a small CNN on CIFAR-10 with ADRE_REG and with Basic (Gaussian augmentation) under Ray Train,
certifies ``num_images`` test images of each with CERTIFY and T-CERTIFY on a pool of Ray actors, writes
the certified-accuracy table and plots, and logs every run to a local MLflow SQLite store inside the
output folder. Everything is written under ``output_dir`` (and nowhere else).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adre_ray.config.certify import CertifyConfig
from adre_ray.config.demo import DemoConfig
from adre_ray.config.flags import SuggestingParser, add_field_flags, load_from_args
from adre_ray.config.train import TrainConfig

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
METHODS = (("adre_reg", "ADRE_REG"), ("gaussian", "Basic"))
RUN_TIME = "About 8-10 minutes on 2 CPU cores"
"""How long the demo takes with the default sizes (``--help`` and the README say the same)."""


@dataclass
class DemoResult:
    output_dir: Path
    tracking_uri: str
    table_markdown: str
    timings_s: dict[str, float] = field(default_factory=dict)
    train_run_ids: dict[str, str] = field(default_factory=dict)
    certify_run_ids: dict[str, str | None] = field(default_factory=dict)


def resolve_data_dir(cfg: DemoConfig) -> tuple[str, str, bool]:
    """(data_dir, source, download): the shared Parquet copy when present, else torchvision's CIFAR-10."""
    if cfg.data_dir != "auto":
        return str(Path(cfg.data_dir).expanduser().resolve()), "auto", cfg.download
    for candidate in (Path("../shared/data/cifar10"), SHARED_CIFAR10):
        if (candidate / "test.parquet").is_file():
            return str(candidate.resolve()), "parquet", False
    return str(Path("data/cifar10").resolve()), "torchvision", cfg.download


def largest_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY or T-CERTIFY can give with ``n`` draws at level ``alpha``:
    sigma * Phi^-1(alpha^(1/n)), reached when all n draws vote for one class (pA_lower = alpha^(1/n));
    T-CERTIFY's radius never exceeds CERTIFY's largest (its two terms are each at most that one)."""
    from scipy.stats import norm

    from adre_ray.smoothing.bounds import pA_lower

    return float(sigma * norm.ppf(pA_lower(n, n, alpha)))


def table_radii(cfg: DemoConfig) -> tuple[list[float], float]:
    """(the table's radii that ``cfg.n`` draws can reach, the largest certifiable radius)."""
    from adre_ray.analysis.metrics import TABLE_RADII

    top = largest_certifiable_radius(cfg.sigma, cfg.n, cfg.alpha)
    return [r for r in TABLE_RADII if r <= top] or [0.0], top


class EpochProgress:
    """Prints a line per finished training epoch while a training runs (``with EpochProgress(...)``),
    read from the run's MLflow metrics (the workers log each epoch there), every ``interval`` s."""

    def __init__(self, label: str, run_name: str, experiment: str, tracking_uri: str, epochs: int,
                 interval: float = 2.0) -> None:
        self.label, self.run_name, self.experiment = label, run_name, experiment
        self.tracking_uri, self.epochs, self.interval = tracking_uri, epochs, interval
        self.shown: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="demo-epoch-progress", daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> EpochProgress:
        import mlflow.tracking  # noqa: F401  (imported here: a first import inside the thread can deadlock)

        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch, if it landed after the previous poll

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Print the epochs logged since the last call (a tracking error is ignored: progress only)."""
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                return
            runs = client.search_runs([experiment.experiment_id],
                                      filter_string=f"attributes.run_name = '{self.run_name}'")
            history = client.get_metric_history(runs[0].info.run_id, "test_acc_noise") if runs else []
        except Exception:  # noqa: BLE001 - progress is best effort
            return
        for point in sorted(history, key=lambda p: p.step):
            if point.step not in self.shown:
                self.shown.add(point.step)
                print(f"[demo] {self.label}: epoch {point.step + 1}/{self.epochs} done, test accuracy under "
                      f"noise {point.value:.3f} ({time.perf_counter() - self._started:.0f} s)", flush=True)


def train_config(cfg: DemoConfig, loss: str, data_dir: str, source: str, download: bool,
                 out: Path, tracking_uri: str) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "data": {"dataset": "cifar10", "data_dir": data_dir, "source": source, "download": download,
                 "train_subset": cfg.train_subset, "test_subset": cfg.test_subset, "loader_workers": 0},
        "loss": {"name": loss, "sigma": cfg.sigma, "k": cfg.k if loss == "adre_reg" else 1,
                 "lam": cfg.lam if loss == "adre_reg" else 0.0},
        "optim": {"lr": cfg.lr, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "epochs": cfg.epochs, "warmup_epochs": min(1, cfg.epochs - 1)},
        "scaling": {"num_workers": cfg.num_workers, "use_gpu": False, "cpus_per_worker": 1},
        "run": {"name": f"demo_{loss}", "experiment": cfg.experiment, "storage_path": str(out / "runs"),
                "tracking_uri": tracking_uri, "seed": cfg.seed, "precision": "fp32", "channels_last": False},
    })


def certify_config(cfg: DemoConfig, checkpoint: str, loss: str, data_dir: str, out: Path,
                   tracking_uri: str) -> CertifyConfig:
    return CertifyConfig.from_dict({
        "checkpoint": checkpoint, "dataset": "cifar10", "data_dir": data_dir, "split": "test",
        "sigma": cfg.sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "skip": cfg.skip,
        "max_images": cfg.num_images, "tcertify_mode": cfg.tcertify_mode, "num_actors": cfg.num_actors,
        "use_gpu": False, "batch_size": cfg.cert_batch_size, "shard_size": max(cfg.n // cfg.num_actors, 1),
        "seed": cfg.seed, "output_dir": str(out / "certify" / loss), "experiment": cfg.experiment,
        "tracking_uri": tracking_uri, "precision": "fp32", "channels_last": False,
    })


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Train both methods, certify both, analyze; returns where everything is and how long it took."""
    import ray

    from adre_ray.analysis import report
    from adre_ray.distributed._common import start_private_ray
    from adre_ray.distributed.certify import run_certification
    from adre_ray.distributed.train import run_training

    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # Ray workers inherit it
    data_dir, source, download = resolve_data_dir(cfg)
    started = time.perf_counter()
    if not ray.is_initialized():  # its own cluster, never one of `ray start`
        start_private_ray(num_cpus=max(cfg.num_workers, cfg.num_actors), include_dashboard=False,
                          log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    result = DemoResult(output_dir=out, tracking_uri=tracking_uri, table_markdown="")
    result_dirs, labels = [], []
    for loss, label in METHODS:
        step = time.perf_counter()
        print(f"[demo] training {label} ({cfg.model}, {cfg.train_subset} images, {cfg.epochs} epochs)",
              flush=True)
        with EpochProgress(label, f"demo_{loss}", cfg.experiment, tracking_uri, cfg.epochs):
            trained = run_training(train_config(cfg, loss, data_dir, source, download, out, tracking_uri))
        result.timings_s[f"train_{loss}"] = time.perf_counter() - step
        result.train_run_ids[label] = trained.mlflow_run_id
        step = time.perf_counter()
        print(f"[demo] certifying {label}: {cfg.num_images} test images, n0={cfg.n0}, n={cfg.n}", flush=True)
        certified = run_certification(certify_config(cfg, trained.checkpoint_path, loss, data_dir, out,
                                                     tracking_uri))
        result.timings_s[f"certify_{loss}"] = time.perf_counter() - step
        result.certify_run_ids[label] = certified.mlflow_run_id
        result_dirs.append(str(certified.output_dir))
        labels.append(label)
    step = time.perf_counter()
    radii, top = table_radii(cfg)
    print(f"[demo] n={cfg.n} draws at alpha={cfg.alpha:g} certify radii up to {top:.3f} (sigma * "
          f"Phi^-1(alpha^(1/n)), sigma={cfg.sigma:g}): the table stops at {radii[-1]:.2f}", flush=True)
    argv = [*result_dirs, *sum((["--label", label] for label in labels), []), "--output-dir",
            str(out / "analysis"), "--plot-method", "both", "--tracking-uri", tracking_uri, "--experiment",
            cfg.experiment, "--log-mlflow", "--radii", *map(str, radii)]
    if report.main(argv) != 0:
        raise RuntimeError(f"analyze failed on {result_dirs}")
    result.timings_s["analyze"] = time.perf_counter() - step
    result.timings_s["total"] = time.perf_counter() - started
    result.table_markdown = (out / "analysis" / "table.md").read_text()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="adre-ray demo",
        description="Train ADRE_REG and Basic on CIFAR-10, certify both (CERTIFY and T-CERTIFY), write the "
                    "table and plots, track everything in a local MLflow store. " + RUN_TIME
                    + "; it prints a line per training epoch.")
    parser.add_argument("--config", help="YAML with DemoConfig fields (default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DemoConfig field, e.g. n=10000 or output_dir=my_demo (repeatable; "
                             "default: none)")
    add_field_flags(parser, DemoConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_from_args(DemoConfig, args)
        result = run_demo(cfg)
    except ValueError as err:
        print(f"adre-ray demo: error: {err}", file=sys.stderr)
        return 2
    out = result.output_dir
    print(f"[demo] done in {result.timings_s['total']:.0f} s: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings_s.items() if k != "total"))
    print(f"[demo] table: {out / 'analysis' / 'table.md'} (and table.csv)")
    print(f"[demo] plots: {out / 'analysis' / 'certified_accuracy.png'}, "
          f"{out / 'analysis'}/certify_vs_tcertify_*.png")
    print(f"[demo] results (Parquet): {out / 'certify'}")
    print(f"[demo] MLflow UI on these runs:\n    mlflow ui --backend-store-uri {result.tracking_uri}\n"
          f"  then open http://127.0.0.1:5000 (experiment '{cfg.experiment}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
