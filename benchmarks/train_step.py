"""Images/s of one training step: Gaussian augmentation vs ADRE_REG (same k) vs ADRE_ADV (M = 1, 2).

    .venv/bin/python benchmarks/train_step.py --model cifar_resnet20 --batch-size 64 --k 4
    .venv/bin/python benchmarks/train_step.py --model cifar_resnet110 --device cuda --batch-size 256 \\
        --k 4 --dtype bf16 --channels-last

Every method runs the project's own step (``adre_ray.training.train_one_epoch`` over ``--steps-per-run``
identical batches: loss, backward, SGD step) on the SAME model object, batch and k, in this process,
alternating methods round by round; medians are reported. The learning rate is 0 (momentum and weight
decay on), so every method does the optimizer's full work on unchanged weights and all methods time the
same model. Target (issue 7): ADRE_REG step time <= 1.1x Gaussian with the same k.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

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
    args = parser.parse_args(argv)
    try:
        args.attack_steps = [int(value) for value in str(args.attack_steps).split(",") if value.strip()]
    except ValueError:
        parser.error(f"--attack-steps={args.attack_steps!r}: must be comma-separated integers")
    for name in ("batch_size", "k", "steps_per_run"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if any(steps < 1 for steps in args.attack_steps):
        parser.error(f"--attack-steps={args.attack_steps}: every M must be >= 1")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
