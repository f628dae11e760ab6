"""The paper's Table 1 claim on a CPU: Basic vs ADRE_REG on the full CIFAR-10, paired, resumable.

    python benchmarks/table1_cpu.py --data-dir ../shared/data/cifar10            # start or continue
    python benchmarks/table1_cpu.py --state-dir benchmarks/table1_cpu_state       # continue (the default)
    python benchmarks/table1_cpu.py --report-only                                 # page + plot from state
    python benchmarks/table1_cpu.py --smoke --data-dir ../shared/data/cifar10     # toy sizes, temp folder

Protocol (fixed in ``docs/results/table1_cpu.md`` before the run; the plan is frozen in
``<state-dir>/plan.json`` at the first start and a later call with other settings is refused):
cifar_resnet20, sigma 0.25, the same seed, schedule, epochs and data order (shuffle and crop/flip drawn
from a generator seeded by (seed, epoch), so identical for both methods) for Basic (Gaussian
augmentation, k = 1) and ADRE_REG (``per_loss: single``, k and lambda of the plan). Certification of
the same test images (0, 20, ..., 9980) for both at n = 10,000, n0 = 100, alpha = 0.001 with skip
misclassified and early abstain (main draws in 10 waves; delta 1e-4 per image), CERTIFY and T-CERTIFY
(mode pilot) on the same counts (adre_ray.smoothing), in the plan's precision and memory format.

State (small files, meant to be committed so that a later session continues):
``<state>/plan.json`` the frozen settings and the machine facts; ``<state>/<method>/train_state.pt``
the latest training state (weights, optimizer, scheduler, RNG, epoch and batches done; replaced
atomically every ``--checkpoint-minutes`` and at each epoch end), ``<state>/<method>/model.pt`` the
trained model (adre_ray checkpoint format, certifiable with ``adre-ray certify``);
``<state>/<method>/certify/part-*.parquet`` certified images (RESULT_SCHEMA rows with ``precision``);
``<state>/progress.jsonl`` one line per finished chunk of work with its wall time. A killed run loses
at most the chunk in progress; the next call continues from the state.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_model
from table1_mini import crop_flip

from adre_ray.analysis.results import completed_indices, ensure_manifest, write_part
from adre_ray.data import load_images
from adre_ray.models import build_model
from adre_ray.models.checkpoint import save_model_checkpoint
from adre_ray.smoothing import (
    MAIN_STREAM,
    NOISE_SCHEME,
    PILOT_STREAM,
    fast_bf16_available,
    prepare_model,
    sample_counts,
)
from adre_ray.smoothing.shortcuts import certify_threshold, should_stop_early, wave_level
from adre_ray.storage import write_bytes_atomic
from adre_ray.training import build_loss, build_scheduler, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE = ROOT / "benchmarks" / "table1_cpu_state"
METHODS = ("basic", "adre_reg")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
GRID = tuple(round(0.1 * t, 1) for t in range(1, 11))  # T-CERTIFY's default grid (mode pilot)
LOGGED = ("loss", "l_per", "l_adre", "train_acc_noise")  # per-epoch training statistics


@dataclass(frozen=True)
class Plan:
    """Every setting of the comparison; frozen in plan.json at the first start."""

    model: str = "cifar_resnet20"
    sigma: float = 0.25
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    train_images: int = 50_000
    adre_k: int = 4
    adre_lambda: float = 0.1
    seed: int = 0
    test_every: int = 20
    test_images: int = 500
    n0: int = 100
    n: int = 10_000
    waves: int = 10
    alpha: float = 0.001
    early_abstain_delta: float = 1e-4
    certify_batch: int = 100
    precision: str = "fp32"
    channels_last: bool = True
    threads: int = 2

    def loss(self, method: str):  # noqa: ANN201 - a LossFn
        if method == "basic":
            return build_loss("gaussian", sigma=self.sigma, k=1)
        return build_loss("adre_reg", sigma=self.sigma, k=self.adre_k, lam=self.adre_lambda,
                          per_loss="single")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


SMOKE = {"model": "small_cnn", "epochs": 2, "batch_size": 16, "train_images": 64, "adre_k": 2,
         "test_every": 500, "test_images": 3, "n0": 8, "n": 64, "waves": 4, "certify_batch": 16}


# ----------------------------------------------------------------------------------------------- state


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def log_progress(state: Path, **event: Any) -> None:
    """Append one JSON line to ``state/progress.jsonl`` (flushed and fsynced: a kill keeps it)."""
    with open(state / "progress.jsonl", "a") as handle:
        handle.write(json.dumps({"at": now(), **event}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_progress(state: Path) -> list[dict[str, Any]]:
    path = state / "progress.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def machine_facts() -> dict[str, Any]:
    """The CPU and its bf16 capability (native AVX512-BF16 / AMX, else emulated)."""
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": fast_bf16_available("cpu"), "python": platform.python_version()}


def freeze_plan(state: Path, plan: Plan) -> None:
    """Write plan.json at the first start; refuse (ValueError naming the field) a differing plan later."""
    path = state / "plan.json"
    wanted = asdict(plan)
    if path.is_file():
        stored = json.loads(path.read_text())["plan"]
        for key, value in wanted.items():
            if stored.get(key) != value:
                raise ValueError(f"{key}={value!r} differs from the plan frozen in {path} "
                                 f"({key}={stored.get(key)!r}); use another --state-dir")
        return
    state.mkdir(parents=True, exist_ok=True)
    record = {"plan": wanted, "frozen_at": now(), "machine": machine_facts()}
    write_bytes_atomic(path, (json.dumps(record, indent=2) + "\n").encode())


def load_plan(state: Path) -> Plan:
    return Plan(**json.loads((state / "plan.json").read_text())["plan"])


def atomic_torch_save(path: Path, obj: Any) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


# -------------------------------------------------------------------------------------------- training


def epoch_order(plan: Plan, epoch: int, count: int) -> tuple[torch.Tensor, ...]:
    """Shuffle and crop/flip draws of one epoch, from a generator seeded by (seed, epoch): the same
    for both methods and for a resumed epoch."""
    generator = torch.Generator().manual_seed(plan.seed * 100_003 + epoch)
    order = torch.randperm(count, generator=generator)
    dy = torch.randint(0, 9, (count,), generator=generator)
    dx = torch.randint(0, 9, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    return order, dy, dx, flip


def epoch_batches(plan: Plan, data: tuple[torch.Tensor, torch.Tensor], epoch: int, first: int, last: int):
    """Batches ``first`` .. ``last - 1`` of ``epoch`` (augmented lazily, in the plan's memory format)."""
    x, y = data
    order, dy, dx, flip = epoch_order(plan, epoch, x.shape[0])
    for b in range(first, last):
        pick = order[b * plan.batch_size:(b + 1) * plan.batch_size]
        images = crop_flip(x[pick], dy[pick], dx[pick], flip[pick])
        yield images.contiguous(memory_format=plan.memory_format), y[pick]


def new_training(plan: Plan, method: str, steps_per_epoch: int) -> dict[str, Any]:
    torch.manual_seed(plan.seed)
    model = build_model(plan.model, 10, "cifar10").to(memory_format=plan.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum,
                                weight_decay=plan.weight_decay)
    scheduler = build_scheduler(optimizer, plan.schedule, epochs=plan.epochs, steps_per_epoch=steps_per_epoch)
    torch.manual_seed(plan.seed + 1)  # the noise draws: the same stream for both methods
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0, "batch": 0,
            "sums": {}, "log": []}


def restore_training(plan: Plan, method: str, steps_per_epoch: int, path: Path) -> dict[str, Any]:
    run = new_training(plan, method, steps_per_epoch)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    run["model"].load_state_dict(saved["model"])
    run["optimizer"].load_state_dict(saved["optimizer"])
    run["scheduler"].load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    run.update(epoch=saved["epoch"], batch=saved["batch"], sums=saved["sums"], log=saved["log"])
    return run


def save_training(path: Path, run: dict[str, Any]) -> None:
    atomic_torch_save(path, {"model": run["model"].state_dict(), "optimizer": run["optimizer"].state_dict(),
                             "scheduler": run["scheduler"].state_dict(), "rng": torch.get_rng_state(),
                             "epoch": run["epoch"], "batch": run["batch"], "sums": run["sums"],
                             "log": run["log"]})


def add_chunk(sums: dict[str, float], stats: dict[str, float]) -> None:
    """Accumulate a chunk's per-image means into epoch sums (weighted by its images)."""
    images = stats["images"]
    for key in LOGGED:
        sums[key] = sums.get(key, 0.0) + stats[key] * images
    for key in ("images", "time_s"):
        sums[key] = sums.get(key, 0.0) + stats[key]


def train_method(plan: Plan, method: str, state: Path, data: tuple[torch.Tensor, torch.Tensor],
                 checkpoint_s: float) -> Path:
    """Train ``method`` to the plan's epochs from its latest state; returns the model file."""
    folder = state / method
    final = folder / "model.pt"
    if final.is_file():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    steps = data[0].shape[0] // plan.batch_size
    path = folder / "train_state.pt"
    run = restore_training(plan, method, steps, path) if path.is_file() else new_training(plan, method, steps)
    loss_fn = plan.loss(method)
    chunk = max(1, steps // 50)
    while run["epoch"] < plan.epochs:
        began = time.perf_counter()
        while True:  # at least one chunk per save, then until the epoch ends or checkpoint_s passed
            last = min(steps, run["batch"] + chunk)
            batches = epoch_batches(plan, data, run["epoch"], run["batch"], last)
            stats = train_one_epoch(run["model"], batches, loss_fn, run["optimizer"], run["scheduler"],
                                    device="cpu", epoch=run["epoch"], amp_dtype=plan.amp_dtype)
            add_chunk(run["sums"], stats)
            run["batch"] = last
            if run["batch"] == steps or time.perf_counter() - began >= checkpoint_s:
                break
        wall = time.perf_counter() - began
        if run["batch"] == steps:
            sums = run["sums"]
            record = {key: sums[key] / sums["images"] for key in LOGGED}
            record.update(epoch=run["epoch"] + 1, images=sums["images"], train_s=sums["time_s"],
                          lr=run["optimizer"].param_groups[0]["lr"])
            run["log"].append(record)
            print(f"  {method} epoch {run['epoch'] + 1}/{plan.epochs}: loss {record['loss']:.3f} "
                  f"acc(noise) {record['train_acc_noise']:.3f} {record['train_s']:.0f} s", flush=True)
            run.update(epoch=run["epoch"] + 1, batch=0, sums={})
        save_training(path, run)
        log_progress(state, stage="train", method=method, epoch=run["epoch"], batch=run["batch"],
                     steps_per_epoch=steps, wall_s=wall)
    save_model_checkpoint(final, run["model"].eval(), model_name=plan.model, num_classes=10,
                          dataset="cifar10",
                          extra={"method": method, "plan": asdict(plan), "train_log": run["log"]})
    path.unlink(missing_ok=True)  # the finished model replaces the training state
    return final


# --------------------------------------------------------------------------------------- certification


def certify_image(plan: Plan, net: torch.nn.Module, image: torch.Tensor, idx: int, label: int
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """Pilot and main counts of one image with skip misclassified and early abstain (main draws in
    ``plan.waves`` waves, one noise shard each; a check after every wave but the last)."""
    options = {"amp_dtype": plan.amp_dtype, "channels_last": plan.channels_last,
               "batch_size": plan.certify_batch, "seed": plan.seed}
    pilot = sample_counts(net, image, plan.n0, 10, plan.sigma, idx=idx, stream=PILOT_STREAM,
                          **options).numpy()
    counts = np.zeros(10, dtype=np.int64)
    top = int(pilot.argmax())
    if top != label:
        return pilot, counts, "skipped_misclassified"
    wave = plan.n // plan.waves
    threshold = certify_threshold(plan.n, plan.alpha)
    level = wave_level(plan.early_abstain_delta, plan.waves - 1)
    for shard in range(plan.waves):
        num = wave if shard < plan.waves - 1 else plan.n - wave * (plan.waves - 1)
        counts += sample_counts(net, image, num, 10, plan.sigma, idx=idx, shard=shard, stream=MAIN_STREAM,
                                **options).numpy()
        done = int(counts.sum())
        if done < plan.n and should_stop_early(int(counts[top]), done, plan.n, threshold, level):
            return pilot, counts, "early_abstain"
    return pilot, counts, "none"


def certify_method(plan: Plan, method: str, state: Path, data_dir: str, checkpoint_s: float) -> Path:
    """Certify the plan's test images with ``method``'s model, resuming from the parts already written."""
    from adre_ray.distributed.certify import result_row
    from adre_ray.models.checkpoint import load_model_checkpoint

    out = state / method / "certify"
    model_file = state / method / "model.pt"
    ensure_manifest(out, {"checkpoint": f"{method}/model.pt", "dataset": "cifar10", "split": "test",
                          "sigma": plan.sigma, "n0": plan.n0, "n": plan.n, "alpha": plan.alpha,
                          "seed": plan.seed, "mode": "pilot", "grid": list(GRID),
                          "shard_size": plan.n // plan.waves, "skip_misclassified": True,
                          "early_abstain": True,
                          "early_abstain_delta": plan.early_abstain_delta, "noise_scheme": NOISE_SCHEME,
                          "precision": plan.precision, "channels_last": plan.channels_last})
    done = completed_indices(out)
    todo = [i for i in range(0, plan.test_every * plan.test_images, plan.test_every) if i not in done]
    if not todo:
        return out
    model = load_model_checkpoint(model_file)
    model = model[0] if isinstance(model, tuple) else model
    net = prepare_model(model.eval(), channels_last=plan.channels_last)
    images, labels = load_images("cifar10", data_dir, "test", todo)
    rows: list[dict[str, Any]] = []
    began = chunk_began = time.perf_counter()
    for position, (idx, image, label) in enumerate(zip(todo, images, labels.tolist(), strict=True)):
        started = time.perf_counter()
        pilot, counts, shortcut = certify_image(plan, net, image, idx, int(label))
        rows.append(result_row(idx, int(label), pilot, counts, sigma=plan.sigma, alpha=plan.alpha,
                               mode="pilot", grid=GRID, seed=plan.seed,
                               time_s=time.perf_counter() - started, checkpoint=f"{method}/model.pt",
                               train_run_id=None, pb_bound="max", shortcut=shortcut, train_sigma=plan.sigma,
                               precision=plan.precision))
        last = position == len(todo) - 1
        if last or time.perf_counter() - chunk_began >= checkpoint_s:
            write_part(out, rows)
            log_progress(state, stage="certify", method=method, images=len(rows),
                         done=len(done) + position + 1, wall_s=time.perf_counter() - chunk_began)
            print(f"  {method} certified {len(done) + position + 1}/{plan.test_images} images "
                  f"({time.perf_counter() - began:.0f} s this call)", flush=True)
            rows, chunk_began = [], time.perf_counter()
    return out


# ---------------------------------------------------------------------------------------------- driver


def run_all(plan: Plan, state: Path, data_dir: str, checkpoint_s: float) -> None:
    torch.set_num_threads(plan.threads)
    freeze_plan(state, plan)
    log_progress(state, stage="start", machine=machine_facts(), pid=os.getpid())
    if not all((state / method / "model.pt").is_file() for method in METHODS):
        began = time.perf_counter()
        stride = 50_000 // plan.train_images  # the rows are sorted by class: a subset strides over all
        x, y = load_images("cifar10", data_dir, "train", list(range(0, 50_000, stride))[:plan.train_images])
        log_progress(state, stage="load_train", wall_s=time.perf_counter() - began)
        for method in METHODS:
            train_method(plan, method, state, (x, y), checkpoint_s)
        del x, y
    for method in METHODS:
        certify_method(plan, method, state, data_dir, checkpoint_s)
    log_progress(state, stage="done")


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text.lower() in ("true", "1")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE), help="the run's state (commit it)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"),
                        help="CIFAR-10 Parquet folder")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "results"), help="report folder")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0,
                        help="save the training state / write result parts at least this often")
    parser.add_argument("--report-only", action="store_true", help="write the page from the state and stop")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, a temp state and report folder")
    for field in fields(Plan):
        kind = parse_bool if isinstance(field.default, bool) else type(field.default)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                            help=f"plan: {field.name} (default {field.default})")
    args = parser.parse_args(argv)
    args.argv = argv
    overrides = {f.name: getattr(args, f.name) for f in fields(Plan) if getattr(args, f.name) is not None}
    if args.smoke:
        overrides = {**SMOKE, **overrides}
        temp = Path(tempfile.mkdtemp(prefix="table1_cpu_smoke_"))
        if args.state_dir == str(DEFAULT_STATE):
            args.state_dir = str(temp / "state")
        if args.out_dir == str(ROOT / "docs" / "results"):
            args.out_dir = str(temp / "results")
    plan_file = Path(args.state_dir) / "plan.json"
    base = asdict(load_plan(Path(args.state_dir))) if plan_file.is_file() else asdict(Plan())
    try:
        args.plan = Plan(**{**base, **overrides})
        check_plan(args.plan)
    except ValueError as err:
        parser.error(str(err))
    if args.checkpoint_minutes <= 0:
        parser.error(f"--checkpoint-minutes={args.checkpoint_minutes}: must be > 0")
    return args


def check_plan(plan: Plan) -> None:
    if plan.precision not in PRECISIONS:
        raise ValueError(f"precision={plan.precision!r}: choose from {', '.join(PRECISIONS)}")
    counts = ("epochs", "batch_size", "adre_k", "test_images", "n0", "n", "waves", "certify_batch", "threads")
    for name in counts:
        if getattr(plan, name) < 1:
            raise ValueError(f"{name}={getattr(plan, name)}: must be >= 1")
    if not 1 <= plan.train_images <= 50_000:
        raise ValueError(f"train_images={plan.train_images}: must lie in [1, 50000] (CIFAR-10's train set)")
    if plan.n < plan.waves:
        raise ValueError(f"n={plan.n}: must be >= waves={plan.waves}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    state = Path(args.state_dir)
    if not args.report_only:
        try:
            run_all(args.plan, state, args.data_dir, 60 * args.checkpoint_minutes)
        except ValueError as err:
            print(f"table1_cpu: {err}", file=sys.stderr)
            return 2
    if not args.no_report:
        from table1_cpu_report import write_report

        print(write_report(state, Path(args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
