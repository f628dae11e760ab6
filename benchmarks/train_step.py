"""Images/s of one training step: Gaussian augmentation vs ADRE_REG (same k) vs ADRE_ADV (M = 1, 2).

    .venv/bin/python benchmarks/train_step.py --model cifar_resnet20 --batch-size 64 --k 4
    .venv/bin/python benchmarks/train_step.py --model cifar_resnet110 --device cuda --batch-size 256 \\
        --k 4 --dtype bf16 --channels-last

Every method runs the project's own step (``adre_ray.training.train_one_epoch`` over ``--steps-per-run``
identical batches: loss, backward, SGD step) on the SAME model object, batch and k, in this process,
alternating methods round by round; medians are reported. The learning rate is 0 (momentum and weight
decay on), so every method does the optimizer's full work on unchanged weights and all methods time the
same model. Target (issue 7): ADRE_REG step time <= 1.1x Gaussian with the same k.

``--suite cifar`` / ``--suite imagenet`` (issue 12) runs the GPU protocol in one command: cifar_resnet110
at batch 400 (Gaussian k = 1 and 8, ADRE_REG k = 8, ADRE_ADV M = 1, 2 at k = 1) or resnet50 at 224x224,
batch 128 (Gaussian k = 1 and 4, ADRE_REG k = 1 and 4, ADRE_ADV M = 1, 2 at k = 1); bf16 + channels_last
(where bf16 is native), the data on the device; ``--compile`` compiles the model (``--methods`` picks a
subset, compilation being minutes per graph). Beside each method: the step's FLOPs, counted on one eager
step with ``torch.utils.flop_counter`` (forward, backward and the attack's passes), over a bf16 matmul
rate measured in the same run: the FLOP floor. Figures are merged into ``train_images_per_s`` (model ->
method -> images/s) of benchmarks/gpu_results.json (``--smoke``: toy sizes on CPU, a temp file).

    python benchmarks/train_step.py --suite cifar && python benchmarks/train_step.py --suite imagenet
    python benchmarks/train_step.py --suite cifar --compile --methods gaussian_k1,gaussian_k8,adre_reg_k8
    python benchmarks/train_step.py --suite cifar --smoke

``--layouts fp32,fp32_cl,bf16,bf16_cl`` (issue 24) times ONE method (``--layout-method``, default adre_reg
at ``--k``) in several precision / memory-format variants side by side: each variant has its own copy of
the same seeded model (``_cl`` = channels_last weights and inputs, ``bf16`` = bf16 autocast, the loss and
ADRE terms in fp32), the rounds alternate, and each variant's images/s is reported with its ratio to
fp32 eager:

    python benchmarks/train_step.py --model cifar_resnet20 --device cpu --threads 2 --batch-size 128 \\
        --k 4 --layouts fp32,fp32_cl,bf16,bf16_cl
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import (
    DTYPES,
    add_common_arguments,
    alternate,
    default_dataset,
    machine_line,
    make_model,
    median,
    pick_device,
    set_threads,
)

from adre_ray.training import LossFn, build_loss, train_one_epoch

BASELINE = "gaussian"
LAYOUTS = {"fp32": ("fp32", False), "fp32_cl": ("fp32", True), "bf16": ("bf16", False),
           "bf16_cl": ("bf16", True)}  # variant -> (dtype, channels_last)
RESULTS_JSON = Path(__file__).resolve().parent / "gpu_results.json"

# method name -> (loss, k, attack steps M or 0)
SUITES: dict[str, dict] = {
    "cifar": {"model": "cifar_resnet110", "dataset": "cifar10", "batch_size": 400,
              "methods": {"gaussian_k1": ("gaussian", 1, 0), "gaussian_k8": ("gaussian", 8, 0),
                          "adre_reg_k8": ("adre_reg", 8, 0), "adre_adv_M1_k1": ("adre_adv", 1, 1),
                          "adre_adv_M2_k1": ("adre_adv", 1, 2)}},
    "imagenet": {"model": "resnet50", "dataset": "imagenet", "batch_size": 128,
                 "methods": {"gaussian_k1": ("gaussian", 1, 0), "gaussian_k4": ("gaussian", 4, 0),
                             "adre_reg_k1": ("adre_reg", 1, 0), "adre_reg_k4": ("adre_reg", 4, 0),
                             "adre_adv_M1_k1": ("adre_adv", 1, 1), "adre_adv_M2_k1": ("adre_adv", 1, 2)}},
}
SMOKE = {"model": "small_cnn", "batch_size": 4}


@dataclass
class StepResult:
    """Seconds per training step of every timed run of each method (gaussian, adre_reg, adre_adv_M1, ...).

    Figures use medians (``best=False``) or the fastest run (``best=True``: least disturbed by load).
    """

    model: str
    device: str
    batch_size: int
    k: int
    step_seconds: dict[str, list[float]]

    def seconds_per_step(self, method: str, best: bool = False) -> float:
        seconds = self.step_seconds[method]
        return min(seconds) if best else median(seconds)

    def images_per_s(self, method: str, best: bool = False) -> float:
        return self.batch_size / self.seconds_per_step(method, best)

    def time_ratio(self, method: str, best: bool = False) -> float:
        """Step time of ``method`` / step time of Gaussian augmentation with the same k."""
        return self.seconds_per_step(method, best) / self.seconds_per_step(BASELINE, best)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, model="cifar_resnet20", batch_size=64)
    parser.add_argument("--k", type=int, default=4, help="noise draws per example (all methods)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--lam", type=float, default=0.5, help="ADRE lambda (ADRE_REG and ADRE_ADV)")
    parser.add_argument("--epsilon", type=float, default=0.5, help="ADRE_ADV attack radius")
    parser.add_argument("--attack-steps", default="1,2", help="comma-separated M values for ADRE_ADV")
    parser.add_argument("--steps-per-run", type=int, default=2, help="training steps per timed run")
    parser.add_argument("--suite", choices=tuple(SUITES), default=None,
                        help="the GPU protocol of issue 12 for CIFAR or ImageNet sizes (ignores --model)")
    parser.add_argument("--methods", default=None, help="--suite: comma-separated subset of its methods")
    parser.add_argument("--smoke", action="store_true", help="--suite at toy sizes on CPU (temp output file)")
    parser.add_argument("--out", default=None,
                        help="--suite: results JSON (default benchmarks/gpu_results.json)")
    parser.add_argument("--layouts", default=None,
                        help=f"comma-separated precision/layout variants of one method, side by side "
                             f"({','.join(LAYOUTS)})")
    parser.add_argument("--layout-method", choices=("gaussian", "adre_reg"), default="adre_reg",
                        help="--layouts: the method timed (at --k)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--layouts: time in process CPU seconds, not wall seconds (on a CPU shared with "
                             "other jobs, at --threads 1 this is the work a step needs, whatever the load)")
    args = parser.parse_args(argv)
    if args.layouts is not None:
        args.layouts = [v.strip() for v in args.layouts.split(",") if v.strip()]
        unknown = [v for v in args.layouts if v not in LAYOUTS]
        if unknown or not args.layouts:
            parser.error(f"--layouts={','.join(args.layouts)}: choose from {','.join(LAYOUTS)}")
    try:
        args.attack_steps = [int(value) for value in str(args.attack_steps).split(",") if value.strip()]
    except ValueError:
        parser.error(f"--attack-steps={args.attack_steps!r}: must be comma-separated integers")
    for name in ("batch_size", "k", "steps_per_run"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if any(steps < 1 for steps in args.attack_steps):
        parser.error(f"--attack-steps={args.attack_steps}: every M must be >= 1")
    if args.suite and args.methods:
        known = SUITES[args.suite]["methods"]
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in known]
        if unknown or not args.methods:
            parser.error(f"--methods={','.join(args.methods)}: choose from {','.join(known)}")
    if args.smoke and args.out and Path(args.out).resolve() == RESULTS_JSON:
        parser.error(f"--out={args.out!r}: --smoke never writes the real results file")
    return args


def run(args: argparse.Namespace) -> StepResult:
    """Build one model and one optimizer, warm every method up once, then time them alternately."""
    device = pick_device(args.device)
    set_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dataset = args.dataset or default_dataset(args.model)
    model, num_classes, size = make_model(args.model, dataset, device, args.seed)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.rand((args.batch_size, 3, size, size), generator=generator)
    y = torch.randint(num_classes, (args.batch_size,), generator=generator)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.to(device).contiguous(memory_format=memory_format)
    y = y.to(device)
    loader = [(x, y)] * args.steps_per_run
    common = dict(sigma=args.sigma, k=args.k)
    losses = {BASELINE: build_loss("gaussian", **common),
              "adre_reg": build_loss("adre_reg", lam=args.lam, **common)}
    for steps in args.attack_steps:
        losses[f"adre_adv_M{steps}"] = build_loss("adre_adv", lam=args.lam, epsilon=args.epsilon, steps=steps,
                                                  **common)
    amp_dtype = DTYPES[args.dtype]

    def runner(loss_fn: LossFn) -> Callable[[], dict[str, float]]:
        return lambda: train_one_epoch(net, loader, loss_fn, optimizer, None, device=device, epoch=10**6,
                                       amp_dtype=amp_dtype)

    variants = {name: runner(loss_fn) for name, loss_fn in losses.items()}
    for variant in variants.values():
        variant()  # warm-up (and compilation with --compile)
    times = alternate(variants, args.repeat, device)
    return StepResult(model=args.model, device=str(device), batch_size=args.batch_size, k=args.k,
                      step_seconds={name: [t / args.steps_per_run for t in runs]
                                    for name, runs in times.items()})


def run_layouts(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of ``args.layout_method`` in each of ``args.layouts``, alternating round by round;
    every variant trains its own copy of the same seeded model on the same batch (learning rate 0)."""
    device = pick_device(args.device)
    set_threads(args.threads)
    dataset = args.dataset or default_dataset(args.model)
    base, num_classes, size = make_model(args.model, dataset, device, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.rand((args.batch_size, 3, size, size), generator=generator).to(device)
    y = torch.randint(num_classes, (args.batch_size,), generator=generator).to(device)
    lam = args.lam if args.layout_method == "adre_reg" else 0.0
    loss_fn = build_loss(args.layout_method, sigma=args.sigma, k=args.k, lam=lam, per_loss="single")

    def runner(dtype: str, channels_last: bool) -> Callable[[], dict[str, float]]:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = copy.deepcopy(base).to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
        loader = [(x.contiguous(memory_format=memory_format), y)] * args.steps_per_run
        return lambda: train_one_epoch(model, loader, loss_fn, optimizer, None, device=device, epoch=10**6,
                                       amp_dtype=DTYPES[dtype])

    variants = {name: runner(*LAYOUTS[name]) for name in args.layouts}
    for variant in variants.values():
        variant()  # warm-up
    times = alternate(variants, args.repeat, device, clock=time.process_time if args.cpu_time else None)
    return {name: [t / args.steps_per_run for t in runs] for name, runs in times.items()}


def print_layouts(args: argparse.Namespace, seconds: dict[str, list[float]]) -> None:
    from adre_ray.smoothing import fast_bf16_available

    print(machine_line(pick_device(args.device)))
    print(f"model {args.model} | {args.layout_method} k {args.k} | batch {args.batch_size} | "
          f"{'process CPU' if args.cpu_time else 'wall'} seconds "
          f"(forward on {args.batch_size * args.k} noisy images) | threads {args.threads} | "
          f"repeat {args.repeat} x {args.steps_per_run} steps | native bf16: "
          f"{fast_bf16_available(pick_device(args.device))}")
    reference = median(seconds[args.layouts[0]])
    print(f"| variant | images/s (median) | ms/step | best ms | vs {args.layouts[0]} |")
    print("|---|---|---|---|---|")
    for name, runs in seconds.items():
        step = median(runs)
        print(f"| {name} | {args.batch_size / step:.1f} | {1000 * step:.1f} | {1000 * min(runs):.1f} | "
              f"{reference / step:.2f}x |")


def step_flops(model: torch.nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
               amp_dtype: torch.dtype | None) -> float:
    """FLOPs of one eager training step (loss incl. any attack, backward; torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from adre_ray.training.modes import autocast

    counter = FlopCounterMode(display=False)
    model.train()
    with counter, autocast(x.device, amp_dtype):
        loss_fn(model, x, y, 10**6).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_suite(args: argparse.Namespace) -> dict:
    """Images/s of every method of ``args.suite`` (one model, one batch on the device) and the FLOP floor."""
    from gpu_suite import fast_settings, matmul_tflops, write_results

    suite = SUITES[args.suite]
    device = pick_device("cpu" if (args.smoke and args.device == "auto") else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = SMOKE["model"] if args.smoke else suite["model"]
    batch = SMOKE["batch_size"] if args.smoke else suite["batch_size"]
    dataset = suite["dataset"] if not args.smoke else "cifar10"
    model, num_classes, size = make_model(name, dataset, device, args.seed)
    model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    amp_dtype = fast_settings(device)["amp_dtype"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.rand((batch, 3, size, size), generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(num_classes, (batch,), generator=generator).to(device)
    tflops = matmul_tflops(device, 128 if args.smoke else 8192)
    methods = {m: suite["methods"][m] for m in (args.methods or suite["methods"])}
    steps = 1 if args.smoke else args.steps_per_run
    loader = [(x, y)] * steps
    rows = {}
    for method, (loss_name, k, attack_steps) in methods.items():
        lam = 0.0 if loss_name == "gaussian" else args.lam
        loss_fn = build_loss(loss_name, sigma=args.sigma, k=k, lam=lam, per_loss="single",
                             epsilon=args.epsilon, steps=max(attack_steps, 1))
        flops = step_flops(model, loss_fn, x, y, amp_dtype)

        def one_run(loss_fn: LossFn = loss_fn) -> dict[str, float]:
            return train_one_epoch(net, loader, loss_fn, optimizer, None, device=device, epoch=10**6,
                                   amp_dtype=amp_dtype)

        one_run()  # warm-up (and compilation with --compile)
        seconds = alternate({method: one_run}, 1 if args.smoke else args.repeat, device)[method]
        step_s = min(seconds) / steps
        floor = flops / (tflops * 1e12)
        rows[method] = {"images_per_s": batch / step_s, "step_s": step_s, "flops_per_step": flops,
                        "floor_step_s": floor, "ratio_to_floor": step_s / floor, "k": k,
                        "M": attack_steps}
        print(f"{name} {method:16s} {batch / step_s:10.1f} images/s  step {1000 * step_s:8.2f} ms  "
              f"floor {1000 * floor:8.2f} ms ({flops / 1e12:.3f} TFLOP)  {step_s / floor:6.1f}x floor",
              flush=True)
    variant = f"{'bf16' if amp_dtype else 'fp32'} + channels_last" + (" + compile" if args.compile else "")
    key = name if not args.compile else f"{name}+compile"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/train_step.py " + " ".join(args.argv)
    record = {"train_images_per_s": {key: {m: r["images_per_s"] for m, r in rows.items()}},
              "train_step": {key: {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                   else "cpu", "torch": torch.__version__, "date": now, "batch_size": batch,
                                   "settings": variant, "sigma": args.sigma, "lam": args.lam,
                                   "epsilon": args.epsilon, "matmul_bf16_tflops": tflops,
                                   "command": command, "methods": rows}}}
    if args.out:
        out = Path(args.out)
    else:
        out = RESULTS_JSON
        if args.smoke:
            out = Path(tempfile.mkdtemp(prefix="train_step_smoke_")) / "gpu_results.json"
    write_results(out, record)
    print(f"merged into {out}")
    print(f"\n#### Training step: {name}, batch {batch}, {variant} ({record['train_step'][key]['device']}, "
          f"{now})\n\nCommand: `{command}`\n")
    print("| method | k | M | images/s | ms/step | FLOP floor ms | x floor |\n|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        print(f"| {method} | {r['k']} | {r['M']} | {r['images_per_s']:.1f} | {1000 * r['step_s']:.2f} | "
              f"{1000 * r['floor_step_s']:.2f} | {r['ratio_to_floor']:.1f}x |")
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.suite:
        args.argv = argv
        run_suite(args)
        return 0
    if args.layouts:
        print_layouts(args, run_layouts(args))
        return 0
    result = run(args)
    print(machine_line(torch.device(result.device)))
    chosen = [name for name in ("channels_last", "compile") if getattr(args, name)]
    print(f"model {result.model} | batch {result.batch_size} | k {result.k} "
          f"(forward on {result.batch_size * result.k} noisy images) | lam {args.lam} | "
          f"epsilon {args.epsilon} | {' + '.join([args.dtype, *chosen])} | "
          f"repeat {args.repeat} x {args.steps_per_run} steps")
    for method in result.step_seconds:
        best_ms = 1000 * result.seconds_per_step(method, best=True)
        print(f"{method:12s} {result.images_per_s(method):9.1f} images/s   "
              f"{1000 * result.seconds_per_step(method):9.1f} ms/step (best {best_ms:.1f})"
              f"   time ratio vs gaussian (same k): best runs {result.time_ratio(method, True):.2f}x, "
              f"median {result.time_ratio(method):.2f}x")
    ratio, best = result.time_ratio("adre_reg"), result.time_ratio("adre_reg", best=True)
    print(f"ADRE_REG / Gaussian step time: best runs {best:.2f}x, median {ratio:.2f}x (target <= 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
