"""Samples/s of the certification sampler vs a reference in the style of the original smoothing code.

    .venv/bin/python benchmarks/certify_throughput.py --model cifar_resnet110 --n 2000 --batch-size 200
    .venv/bin/python benchmarks/certify_throughput.py --model cifar_resnet110 --dtype bf16 --channels-last
    .venv/bin/python benchmarks/certify_throughput.py --model resnet50 --device cuda --batch-size 1000 \\
        --n 20000 --dtype bf16 --channels-last --compile

OURS is ``adre_ray.smoothing.sample_counts`` on ``prepare_model(model, ...)`` with the chosen flags.
REFERENCE is Cohen et al.'s ``Smooth._sample_noise`` as published: per batch ``x.repeat``,
``torch.randn_like(batch) * sigma``, an fp32 forward under ``torch.no_grad``, ``.argmax(1)`` and counts
by a Python loop over the predictions. Both run in this process on the same model object (same weights),
the same n and the same batch size (above one noise block ours rounds it to whole blocks,
``effective_batch_size``; the reference uses that rounded size too); runs alternate and medians are
reported. Seconds per image at n = 100,000 are extrapolated from the measured rate (the n0 = 100
pilot draws, +0.1%, are not included).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import numpy as np
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
    synchronize,
)

from adre_ray.smoothing.sampler import (
    _noise_batches,
    _noise_filler,
    default_noise,
    effective_batch_size,
    prepare_model,
    sample_counts,
)

N_CERTIFY = 100_000


def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    """Cohen et al.'s ``Smooth._count_arr``: a Python loop over the predictions."""
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def reference_counts(model: torch.nn.Module, x: torch.Tensor, num: int, num_classes: int, sigma: float,
                     batch_size: int) -> np.ndarray:
    """Cohen et al.'s ``Smooth._sample_noise`` (code/core.py), with the model and device passed in."""
    device = x.device
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        remaining = num
        for _ in range(int(np.ceil(num / batch_size))):
            this_batch_size = min(batch_size, remaining)
            remaining -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch, device=device) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += _count_arr(predictions.cpu().numpy(), num_classes)
        return counts


@dataclass
class ThroughputResult:
    """Seconds of every timed run of both samplers; ``compile_s``: the first (compiling) call, if any.

    Rates use medians (``best=False``) or the fastest run (``best=True``: the run least disturbed by
    other processes on a shared machine).
    """

    model: str
    device: str
    batch_size: int
    n: int
    ours_seconds: list[float]
    reference_seconds: list[float]
    compile_s: float
    noise_seconds: list[float]
    ours_counts: list[int]
    reference_counts: list[int]

    def samples_per_s(self, which: str, best: bool = False) -> float:
        seconds = self.ours_seconds if which == "ours" else self.reference_seconds
        return self.n / (min(seconds) if best else median(seconds))

    def ratio(self, best: bool = False) -> float:
        """Samples/s of ours / samples/s of the reference."""
        return self.samples_per_s("ours", best) / self.samples_per_s("reference", best)

    def noise_share(self) -> float:
        """Median time of our noise + add alone (no model) / median time of ours: the sampler's overhead."""
        return median(self.noise_seconds) / median(self.ours_seconds)

    def seconds_per_image(self, which: str, n: int = N_CERTIFY) -> float:
        """Seconds for ``n`` draws of one image at the median rate (extrapolated)."""
        return n / self.samples_per_s(which)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, model="cifar_resnet110", batch_size=200)
    parser.add_argument("--n", type=int, default=2000, help="noise draws per timed run (both samplers)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA only: compile with CUDA graphs (mode=reduce-overhead)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n={args.n}: must be >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size}: must be >= 1")
    return args


def run(args: argparse.Namespace) -> ThroughputResult:
    """Build the model, warm both samplers up (compiling if asked), then time them alternately."""
    device = pick_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True: needs --device cuda (got {device})")
    set_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    dataset = args.dataset or default_dataset(args.model)
    model, num_classes, size = make_model(args.model, dataset, device, args.seed)
    model.eval()
    batch = effective_batch_size(args.batch_size, (3, size, size))
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.rand((3, size, size), generator=generator).to(device)
    amp_dtype = DTYPES[args.dtype]
    # ours runs a prepared deep copy (same weights): prepare_model converts layouts in place
    ours_model = copy.deepcopy(model) if (args.channels_last or args.compile or args.cuda_graphs) else model
    ours_model = prepare_model(ours_model, channels_last=args.channels_last, compile=args.compile,
                               cuda_graphs=args.cuda_graphs)

    def ours() -> torch.Tensor:
        return sample_counts(ours_model, x, args.n, num_classes, args.sigma, batch_size=batch, seed=args.seed,
                             amp_dtype=amp_dtype, channels_last=args.channels_last)

    def reference() -> np.ndarray:
        return reference_counts(model, x, args.n, num_classes, args.sigma, batch)

    synchronize(device)
    began = time.perf_counter()
    ours_counts = ours()  # warm-up; compiles every batch shape of this n
    compile_s = time.perf_counter() - began if (args.compile or args.cuda_graphs) else 0.0
    reference_out = reference()
    def noise_only() -> None:
        fill = _noise_filler(default_noise(device), args.seed, device, x.shape)
        for _ in _noise_batches(x, args.n, args.sigma, batch, fill, args.channels_last):
            pass

    times = alternate({"reference": reference, "ours": ours}, args.repeat, device)
    noise_only()
    noise_seconds = alternate({"noise": noise_only}, args.repeat, device)["noise"]
    return ThroughputResult(
        model=args.model, device=str(device), batch_size=batch, n=args.n,
        ours_seconds=times["ours"], reference_seconds=times["reference"],
        compile_s=compile_s, noise_seconds=noise_seconds, ours_counts=ours_counts.tolist(),
        reference_counts=reference_out.tolist())


def flags(args: argparse.Namespace) -> str:
    chosen = [name for name in ("channels_last", "compile", "cuda_graphs") if getattr(args, name)]
    return " + ".join([args.dtype, *chosen])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    device = torch.device(result.device)
    print(machine_line(device))
    print(f"model {result.model} | batch {result.batch_size} | n {result.n} | repeat {args.repeat} | "
          f"ours: {flags(args)} | reference: fp32, no_grad, x.repeat + randn_like, Python count loop")
    if result.compile_s:
        print(f"first call incl. compilation: {result.compile_s:.1f} s (not in the rates)")
    for which in ("reference", "ours"):
        print(f"{which:10s} {result.samples_per_s(which):10.1f} samples/s (median; best run "
              f"{result.samples_per_s(which, best=True):.1f})   "
              f"{result.seconds_per_image(which):9.1f} s/image at n=100,000 (extrapolated)")
    print(f"of which noise + add (no model): {100 * result.noise_share():.1f}% of ours' time")
    print(f"ratio ours/reference: median {result.ratio():.2f}x, best runs {result.ratio(best=True):.2f}x")
    top = (int(np.argmax(result.ours_counts)), int(np.argmax(result.reference_counts)))
    print(f"top class ours / reference (same model, independent noise): {top[0]} / {top[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
