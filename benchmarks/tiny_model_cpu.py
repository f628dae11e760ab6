"""Samples/s of a certification actor's sampling path vs the original code's loop, for a tiny model on CPU.

    .venv/bin/python benchmarks/tiny_model_cpu.py --checkpoint imported.pt --data small_mnist_test.npz \\
        --n 100000 --repeat 5

OURS is exactly what a CPU certification actor runs: ``CertifyWorker.count`` (batch chosen by the model's
cost, native kernels for tiny convolutions: ``adre_ray.smoothing.cpu_speed``; the model's affine prefix
folded into one dense map and its linear layers as oneDNN GEMMs with bias and ReLU fused:
``adre_ray.smoothing.affine_fold``; torch.randn's values from ``adre_ray.smoothing.torch_cpu_normal``)
on one shard of ``n`` draws. REFERENCE is ``certify_throughput.reference_counts`` (Cohen et al.'s
``Smooth._sample_noise``: ``x.repeat``, ``randn_like * sigma``, fp32 forward, ``argmax``, counts) at the
original batch of 400, on the same module object. NOISE is the same n draws alone, drawn as ours draws
them (the part of ours that the noise scheme fixes); RANDN the same values from ``torch.randn``. FLOOR
is NOISE plus the model's ``nn.Linear`` layers alone (``F.linear`` on inputs of their shapes, at the
batch where they run fastest, in MKL): work that any implementation of the same base classifier with
the same noise must do, so ``floor / reference`` bounds the speed-up any sampling path can reach on this
model and CPU (the convolutions, activations, argmax and Python are left out of the floor: an optimistic
bound). Same process, one torch thread (one actor's), rounds alternating; medians, best runs, and the
median of each round's own ours / reference ratio (the two run seconds apart in a round, so load that
comes and goes on a shared host moves both).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import numpy as np
import torch
from _common import alternate, median
from certify_throughput import reference_counts

from adre_ray.distributed.worker import CertifyWorker
from adre_ray.smoothing import torch_cpu_normal
from adre_ray.smoothing.affine_fold import FoldedModel
from adre_ray.smoothing.cpu_speed import cpu_kernels
from adre_ray.smoothing.sampler import _noise_filler, prepare_model, sample_counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="adre-ray checkpoint (e.g. an imported model_fn one)")
    parser.add_argument("--data", required=True, help="arrays .npz: the first sample is used")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--reference-batch", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layout-check", type=int, default=0, metavar="K",
                        help="also compare the counts of the first K samples in NCHW and channels_last")
    args = parser.parse_args(argv)
    worker = CertifyWorker(args.checkpoint, num_classes=None, sigma=args.sigma, seed=0, batch_size=1000,
                           cpu_threads=args.threads)
    with np.load(args.data) as arrays:
        x = torch.from_numpy(np.ascontiguousarray(arrays["x"][0], dtype=np.float32))
    classes = worker.output_classes(x)
    variants = {
        "reference": lambda: reference_counts(worker.model, x, args.n, classes, args.sigma,
                                              args.reference_batch),
        "ours": lambda: worker.count(x, 0, 1, 0, args.n),
        "noise": lambda: sampler_noise(args.n, tuple(x.shape)),
        "randn": lambda: torch.randn((args.n, *x.shape), generator=torch.Generator().manual_seed(0)),
    }
    variants["floor"], floor_batch = floor_of(worker.model, args.n, variants["noise"])
    for variant in variants.values():
        variant()  # warm-up
    times = alternate(variants, args.repeat, torch.device("cpu"))
    rate = {name: args.n / median(seconds) for name, seconds in times.items()}
    best = {name: args.n / min(seconds) for name, seconds in times.items()}
    sampled = worker.model_for(tuple(x.shape))
    folded = (f"{tuple(sampled.matrix.shape)[0]} x {tuple(sampled.matrix.shape)[1]}"
              if isinstance(sampled, FoldedModel) else "none")
    print(f"threads {torch.get_num_threads()}, n {args.n}, sample {tuple(x.shape)}, ours batch "
          f"{worker.batch_for(tuple(x.shape))}, native convolutions {worker.native_convolutions}, "
          f"folded affine prefix {folded}\nCPU noise: {torch_cpu_normal.status()}")
    for name in variants:
        print(f"{name:<10} {rate[name]:>12,.0f} samples/s (median)  {best[name]:>12,.0f} (best run)")
    paired = median([ref / ours for ref, ours in zip(times["reference"], times["ours"], strict=True)])
    print(f"ours / reference: {rate['ours'] / rate['reference']:.2f}x median, "
          f"{best['ours'] / best['reference']:.2f}x best runs, {paired:.2f}x median of the rounds' own "
          f"ratios; noise alone is {rate['ours'] / rate['noise']:.0%} of ours' time")
    print(f"ceiling (floor / reference, linear layers at batch {floor_batch}): "
          f"{rate['floor'] / rate['reference']:.2f}x median, "
          f"{best['floor'] / best['reference']:.2f}x best runs: no sampling path of this model with this "
          f"noise can be faster than the floor")
    if args.layout_check:
        layout_check(worker, args.data, args.layout_check, args.n, args.sigma, classes)
    return 0


FLOOR_BATCHES = (256, 512, 1024, 2048, 4096, 8192, 16384)


def sampler_noise(n: int, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """The n draws of one shard as the sampler draws them on CPU (``torch_cpu_normal`` where available)."""
    noise = torch.empty((n, *sample_shape))
    _noise_filler("torch", 0, torch.device("cpu"), sample_shape)(noise, 0)
    return noise


def floor_of(model: torch.nn.Module, n: int, noise: Callable[[], object]) -> tuple[Callable[[], None], int]:
    """(run, batch): ``run`` calls ``noise`` (the NOISE variant: the n draws) and runs every ``nn.Linear`` of
    ``model`` on (batch, in_features) inputs ``ceil(n / batch)`` times, at the batch of
    ``FLOOR_BATCHES`` where those layers alone ran fastest here (MKL's GEMMs gain from a batch that stays
    in cache): a lower bound on any path's time for the same classifier and noise."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def linear_layers(batch: int) -> Callable[[], None]:
        inputs = [torch.rand(batch, layer.in_features) for layer in layers]

        def run() -> None:
            with torch.inference_mode():
                for _ in range(-(-n // batch)):
                    for layer, inp in zip(layers, inputs, strict=True):
                        torch.nn.functional.linear(inp, layer.weight, layer.bias)

        return run

    timed = {batch: min(alternate({"linear": linear_layers(batch)}, 3, torch.device("cpu"))["linear"])
             for batch in FLOOR_BATCHES}
    batch = min(timed, key=timed.get)
    linear = linear_layers(batch)

    def run() -> None:
        noise()
        linear()

    return run, batch


def layout_check(worker: CertifyWorker, data: str, images: int, n: int, sigma: float, classes: int) -> None:
    """Counts of the first ``images`` samples at ``n`` draws in NCHW vs channels_last (the worker's
    kernels), and the largest logit difference on one noisy batch: is channels_last exact here?"""
    with np.load(data) as arrays:
        xs = torch.from_numpy(np.ascontiguousarray(arrays["x"][:images], dtype=np.float32))
    if xs.dim() != 4:
        print(f"layout check: samples of shape {tuple(xs.shape[1:])} are no images")
        return
    nchw = worker.model
    nhwc = prepare_model(copy.deepcopy(nchw), channels_last=True)
    same = 0
    with cpu_kernels(worker.native_convolutions):
        for i, x in enumerate(xs):
            kwargs = dict(batch_size=worker.batch_for(tuple(x.shape)), seed=0, idx=i)
            a = sample_counts(nchw, x, n, classes, sigma, **kwargs)
            b = sample_counts(nhwc, x, n, classes, sigma, channels_last=True, **kwargs)
            same += bool(torch.equal(a, b))
        noise = torch.randn((4096, *xs.shape[1:]), generator=torch.Generator().manual_seed(0))
        probe = xs[:1] + sigma * noise
        with torch.inference_mode():
            gap = (nchw(probe) - nhwc(probe.contiguous(memory_format=torch.channels_last))).abs().max()
    print(f"layout check: counts identical in NCHW and channels_last on {same} of {images} samples "
          f"(n = {n}); largest logit difference on 4,096 noisy inputs {float(gap):.3g}")


if __name__ == "__main__":
    sys.exit(main())
