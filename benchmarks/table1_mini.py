"""The paper's Table 1 comparison at small scale: Basic (Gaussian augmentation) vs ADRE_REG, same model,
schedule, epochs and seed, then CERTIFY and T-CERTIFY of 500 CIFAR-10 test images. No Ray, no MLflow.

    python benchmarks/table1_mini.py --data-dir data/cifar10                 # all 6 runs, then the report
    python benchmarks/table1_mini.py --runs basic_s0.25,adre_l0.1_s0.25,adre_l0.2_s0.25 --no-report
    python benchmarks/table1_mini.py --report-only                           # table + plot from the runs
    python benchmarks/table1_mini.py --smoke --data-dir /work/shared/data/cifar10   # CPU, toy, temp dir

Protocol (ADRE paper, Table 1; Cohen et al.'s CIFAR-10 training scaled down): cifar_resnet20 (``--model``),
SGD lr 0.1, momentum 0.9, weight decay 1e-4 (every parameter, as the original codes), batch 256, step
schedule /10 at 1/3 and 2/3 of ``--epochs`` (the papers' 50/100 of 150, scaled), the train set held on the
device with random crop (padding 4) + horizontal flip done there. Basic: Gaussian augmentation, one draw
(k = 1). ADRE_REG: k = 8, ``per_loss: single``, lambda in {0.1, 0.2}. sigma in {0.25, 0.5}. bf16 autocast +
channels_last where bf16 is native. Certification: test images 0, 20, ..., 9980 (500), n0 = 100,
n = 10,000, alpha = 0.001, noise seed 0; CERTIFY and T-CERTIFY (mode ``pilot``, valid at alpha) on the same
counts (``adre_ray.smoothing``).

Each run writes ``<runs-dir>/<run>.parquet`` (one row per image, the result schema's certification columns;
the run's settings, training log and wall times in the file's metadata), so runs can be split over several
calls and the report made anywhere: ``docs/results/table1_mini.md`` (certified accuracy at r = 0, 0.25, ...,
1.0 and ACR per method and sigma, the paper's layout) and ``docs/results/table1_mini.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _common import pick_device

from adre_ray.analysis.plots import plot_certified_accuracy
from adre_ray.analysis.tables import certified_accuracy_table, to_markdown
from adre_ray.data import dataset_info, load_images
from adre_ray.models import build_model
from adre_ray.smoothing import (
    MAIN_STREAM,
    NOISE_SCHEME,
    PILOT_STREAM,
    certify_counts,
    fast_bf16_available,
    predict_counts,
    prepare_model,
    sample_counts,
    tcertify_counts,
)
from adre_ray.training import build_loss, build_scheduler, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
META_KEY = b"adre_ray.table1_mini"


@dataclass(frozen=True)
class Run:
    """One training + certification run of the table."""

    name: str
    loss: str
    sigma: float
    lam: float
    k: int


def all_runs(basic_k: int = 1, adre_k: int = 8) -> dict[str, Run]:
    runs = {}
    for sigma in (0.25, 0.5):
        runs[f"basic_s{sigma}"] = Run(f"basic_s{sigma}", "gaussian", sigma, 0.0, basic_k)
        for lam in (0.1, 0.2):
            runs[f"adre_l{lam}_s{sigma}"] = Run(f"adre_l{lam}_s{sigma}", "adre_reg", sigma, lam, adre_k)
    return runs


@dataclass
class Settings:
    model: str = "cifar_resnet20"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    train_images: int = 50_000
    test_every: int = 20
    test_images: int = 500
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    certify_batch: int = 2048
    seed: int = 0
    compile: bool = False


def smoke_settings() -> Settings:
    return Settings(
        model="small_cnn",
        epochs=1,
        batch_size=16,
        train_images=64,
        test_every=500,
        test_images=3,
        n0=8,
        n=64,
        certify_batch=32,
    )


# -------------------------------------------------------------------------------------------- training


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip on a device batch (zero padding, as torchvision)."""
    batch = x.shape[0]
    dy = torch.randint(0, 9, (batch,), generator=generator, device=x.device)
    dx = torch.randint(0, 9, (batch,), generator=generator, device=x.device)
    flip = torch.rand(batch, generator=generator, device=x.device) < 0.5
    return crop_flip(x, dy, dx, flip)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The crop at offsets (dy, dx) of the zero-padded (4 pixels) images, mirrored where ``flip``."""
    batch, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    rows = (dy[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    cropped = padded[torch.arange(batch, device=x.device)[:, None, None, None], channels, rows, cols]
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def device_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator, channels_last: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented batches, all on the device (the last partial batch dropped)."""
    order = torch.randperm(x.shape[0], generator=generator, device=x.device)
    out = []
    for start in range(0, x.shape[0] - batch_size + 1, batch_size):
        pick = order[start : start + batch_size]
        images = augment(x[pick], generator)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out.append((images, y[pick]))
    return out


def train(
    run: Run,
    settings: Settings,
    data: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, 10, "cifar10").to(device).to(memory_format=torch.channels_last)
    net = torch.compile(model) if settings.compile else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    steps = data[0].shape[0] // settings.batch_size
    step_size = max(1, settings.epochs // 3) if settings.epochs >= 3 else settings.epochs
    scheduler = build_scheduler(
        optimizer, "step", epochs=settings.epochs, steps_per_epoch=steps, step_size=step_size, gamma=0.1
    )
    loss_fn = build_loss(run.loss, sigma=run.sigma, k=run.k, lam=run.lam, per_loss="single")
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    log = []
    for epoch in range(settings.epochs):
        batches = device_batches(*data, settings.batch_size, generator, channels_last=True)
        stats = train_one_epoch(
            net, batches, loss_fn, optimizer, scheduler, device=device, epoch=epoch, amp_dtype=amp_dtype
        )
        log.append(
            {key: stats[key] for key in ("loss", "l_per", "l_adre", "train_acc_noise", "time_s", "lr")}
        )
        print(
            f"  {run.name} epoch {epoch + 1}/{settings.epochs}: loss {stats['loss']:.3f} "
            f"acc(noise) {stats['train_acc_noise']:.3f} {stats['time_s']:.1f} s",
            flush=True,
        )
    return model.eval(), log


# --------------------------------------------------------------------------------------- certification


def certify(
    run: Run,
    model: torch.nn.Module,
    settings: Settings,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    data_dir: str,
) -> list[dict[str, Any]]:
    """CERTIFY and T-CERTIFY (pilot) rows of the test images on the same counts."""
    indices = list(range(0, settings.test_every * settings.test_images, settings.test_every))
    images, labels = load_images("cifar10", data_dir, "test", indices)
    net = prepare_model(model, channels_last=True, compile=settings.compile)
    options = {
        "amp_dtype": amp_dtype,
        "channels_last": True,
        "pad_batches": settings.compile,
        "batch_size": settings.certify_batch,
        "seed": settings.seed,
    }
    rows = []
    for idx, image, label in zip(indices, images, labels.tolist(), strict=True):
        began = time.perf_counter()
        pilot = sample_counts(net, image, settings.n0, 10, run.sigma, idx=idx, stream=PILOT_STREAM, **options)
        counts = sample_counts(net, image, settings.n, 10, run.sigma, idx=idx, stream=MAIN_STREAM, **options)
        pilot, counts = pilot.numpy(), counts.numpy()
        cert = certify_counts(pilot, counts, run.sigma, settings.alpha)
        tcert = tcertify_counts(pilot, counts, run.sigma, settings.alpha, mode="pilot")
        rows.append(
            {
                "idx": idx,
                "label": int(label),
                "predict": int(predict_counts(counts, settings.alpha).predict),
                "correct": bool(cert.predict == label),
                "correct_tcertify": bool(tcert.predict == label),
                "certify_predict": int(cert.predict),
                "tcertify_predict": int(tcert.predict),
                "radius_certify": float(cert.radius),
                "radius_tcertify": float(tcert.radius),
                "tcertify_mode": "pilot",
                "counts": counts.tolist(),
                "pilot_counts": pilot.tolist(),
                "n0": settings.n0,
                "n": settings.n,
                "alpha": settings.alpha,
                "sigma": run.sigma,
                "seed": settings.seed,
                "noise_scheme": NOISE_SCHEME,
                "time_s": time.perf_counter() - began,
            }
        )
    return rows


def do_run(
    run: Run,
    settings: Settings,
    args: argparse.Namespace,
    device: torch.device,
    data: tuple[torch.Tensor, torch.Tensor],
) -> Path:
    amp_dtype = torch.bfloat16 if fast_bf16_available(device) else None
    began = time.perf_counter()
    model, log = train(run, settings, data, device, amp_dtype)
    train_s = time.perf_counter() - began
    began = time.perf_counter()
    rows = certify(run, model, settings, device, amp_dtype, args.data_dir)
    certify_s = time.perf_counter() - began
    meta = {
        "run": asdict(run),
        "settings": asdict(settings),
        "train_s": train_s,
        "certify_s": certify_s,
        "train_log": log,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "amp": "bf16" if amp_dtype else "fp32",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/table1_mini.py " + " ".join(args.argv),
    }
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    path = Path(args.runs_dir) / f"{run.name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    print(
        f"  {run.name}: trained in {train_s:.0f} s, certified {len(rows)} images in {certify_s:.0f} s "
        f"-> {path}",
        flush=True,
    )
    return path


# ---------------------------------------------------------------------------------------------- report


def report(runs_dir: Path, out_md: Path, out_png: Path) -> str:
    """The table (paper layout: rows per method and sigma) and the plot, from the run files present."""
    tables, metas = {}, {}
    for name in all_runs():
        path = runs_dir / f"{name}.parquet"
        if path.is_file():
            table = pq.read_table(path)
            tables[name] = table
            metas[name] = json.loads(table.schema.metadata[META_KEY])
    if not tables:
        raise ValueError(f"runs_dir={str(runs_dir)!r}: no run files (<run>.parquet) to report")
    rows = certified_accuracy_table(tables, RADII, method="both")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(metas.values()))
    s = first["settings"]
    lines = [
        "# Table 1 at small scale: Basic vs ADRE_REG on CIFAR-10",
        "",
        f"Made by `benchmarks/table1_mini.py` on {first['device']} (torch {first['torch']}, {first['amp']}"
        f" + channels_last), {first['date']}.",
        "",
        f"Model {s['model']}, {s['epochs']} epochs, batch {s['batch_size']}, SGD lr {s['lr']} momentum "
        f"{s['momentum']} weight decay {s['weight_decay']}, step schedule /10 at 1/3 and 2/3 of the epochs, "
        f"{s['train_images']} training images, seed {s['seed']}. Certification: {s['test_images']} test "
        f"images (every {s['test_every']}th), n0 = {s['n0']}, n = {s['n']}, alpha = {s['alpha']}, "
        f"T-CERTIFY mode pilot, noise scheme {NOISE_SCHEME}. Certified accuracy in %, ACR in l2 pixel units.",
        "",
        to_markdown(rows),
        "",
        "| run | loss | sigma | lambda | k | train s | certify s | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, meta in metas.items():
        run = meta["run"]
        lines.append(
            f"| {name} | {run['loss']} | {run['sigma']} | {run['lam']} | {run['k']} | "
            f"{meta['train_s']:.0f} | {meta['certify_s']:.0f} | `{meta['command']}` |"
        )
    lines += ["", f"![certified accuracy]({out_png.name})", ""]
    text = "\n".join(lines)
    out_md.write_text(text)
    plot_certified_accuracy(
        tables, out_png, method="certify", title=f"CIFAR-10, {s['model']}, {s['epochs']} epochs (CERTIFY)"
    )
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 Parquet folder")
    parser.add_argument("--runs", default=None, help=f"comma-separated subset of {','.join(all_runs())}")
    parser.add_argument("--runs-dir", default=None, help="per-run Parquet files (default runs/table1_mini)")
    parser.add_argument("--out-dir", default=None, help="report folder (default docs/results)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=None, help="certification draws per image (>= 10,000)")
    parser.add_argument("--compile", action="store_true", help="torch.compile training and certification")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU, everything in a temp folder")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    args.argv = argv
    known = all_runs()
    args.run_list = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else list(known)
    unknown = [r for r in args.run_list if r not in known]
    if unknown or not args.run_list:
        parser.error(f"--runs={args.runs!r}: choose from {','.join(known)}")
    settings = smoke_settings() if args.smoke else Settings()
    for name in ("epochs", "model", "n"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.compile = bool(args.compile)
    if not args.smoke and (settings.epochs < 30 or settings.n < 10_000):
        parser.error(
            f"epochs={settings.epochs}, n={settings.n}: the protocol needs epochs >= 30 and "
            "n >= 10,000 (use --smoke for a toy run)"
        )
    args.settings = settings
    if args.smoke:
        temp = Path(tempfile.mkdtemp(prefix="table1_mini_smoke_"))
        args.runs_dir = args.runs_dir or str(temp / "runs")
        args.out_dir = args.out_dir or str(temp / "results")
        if Path(args.out_dir).resolve() == (ROOT / "docs" / "results").resolve():
            parser.error(f"--out-dir={args.out_dir!r}: --smoke never writes docs/results")
    args.runs_dir = args.runs_dir or str(ROOT / "runs" / "table1_mini")
    args.out_dir = args.out_dir or str(ROOT / "docs" / "results")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out_md, out_png = Path(args.out_dir) / "table1_mini.md", Path(args.out_dir) / "table1_mini.png"
    if not args.report_only:
        device = pick_device("cpu" if (args.smoke and args.device == "auto") else args.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        settings = args.settings
        if dataset_info("cifar10").image_size != 32:
            raise ValueError("table1_mini expects 32x32 CIFAR-10")
        x, y = load_images("cifar10", args.data_dir, "train", list(range(settings.train_images)))
        data = (x.to(device), y.to(device))
        runs = all_runs()
        for name in args.run_list:
            do_run(runs[name], settings, args, device, data)
    if not args.no_report:
        print(report(Path(args.runs_dir), out_md, out_png))
        print(f"wrote {out_md} and {out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
