"""The GPU suite, one command: check the sampler, then time certification against the original code's style
and against the FLOP floor, then time the job's own worker (``CertifyWorker``, no Ray).

    python benchmarks/gpu_suite.py                  # everything (about 3 device calls' worth: use --only)
    python benchmarks/gpu_suite.py --only correctness
    python benchmarks/gpu_suite.py --only certify,worker --models cifar_resnet110
    python benchmarks/gpu_suite.py --only certify,worker --models resnet50
    python benchmarks/gpu_suite.py --smoke                      # CPU, toy sizes, writes to a temp folder

Sections (``--only``; the machine facts, the bf16 matmul rate and the models' FLOPs are measured every time):

- correctness: (1) the noise of a shard is bit-identical for several batch sizes, and the counts of fp32
  eager sampling are compared across those batch sizes; (2) a trained-like model (``--train-steps`` SGD
  steps of Gaussian augmentation on CIFAR-10 from ``--data-dir``) certifies test images with fp32 eager
  and with the fast path (bf16 + channels_last + compile or CUDA graphs, same seed, same noise): the
  suite reports whether CERTIFY's class is the same on every image and the measured count difference
  (total variation between the two count vectors, and |pA_lower difference|).
- certify: per model, samples/s of OURS (eager bf16 + channels_last) over a batch-size sweep, then the best
  batch with compile (and CUDA graphs for the CIFAR models); the REFERENCE (Cohen et al.'s
  ``_sample_noise``: repeat, randn_like, fp32 forward, argmax, Python count loop) at batch 400 and over the
  sweep; then one image timed end to end at n0 + n (100 + 100,000) with ours' best settings and with the
  reference at batch 400. The FLOP floor: (n0 + n) * FLOPs per image / the bf16 matmul rate measured here.
- worker: the same image through ``adre_ray.distributed.worker.CertifyWorker`` (the actor's body), n0 in one
  shard and n in shards of about 10,000 draws (a multiple of the batch), as the certification job runs it.

Writes ``--out`` (default benchmarks/gpu_results.json), merged into what the file already holds, and prints
a Markdown section for benchmarks/RESULTS.md last. ``--smoke`` runs the same code at toy sizes (small_cnn,
tiny n) and writes into a temporary folder, never into benchmarks/gpu_results.json. Every figure comes
from a run in this process: nothing is extrapolated, except the "samples/s" of the sweep, which are rates.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import default_dataset, make_model, pick_device, synchronize
from certify_throughput import reference_counts

from adre_ray.device import set_numerics
from adre_ray.smoothing.certify import certify_counts
from adre_ray.smoothing.noise import philox_normal
from adre_ray.smoothing.sampler import (
    MAIN_STREAM,
    PILOT_STREAM,
    _noise_batch_sizes,
    _noise_batches,
    _noise_filler,
    default_noise,
    effective_batch_size,
    noise_block,
    noise_scheme,
    noise_seed,
    prepare_model,
    sample_counts,
)

SECTIONS = ("correctness", "certify", "worker")
DEFAULT_OUT = Path(__file__).resolve().parent / "gpu_results.json"
REFERENCE_BATCH = 400
SIGMA = 0.25
ALPHA = 0.001


@dataclass
class Plan:
    """Sizes of one run: the full GPU plan, or the toy plan of ``--smoke``."""

    models: list[str]
    n: int = 100_000
    n0: int = 100
    sweep: dict[str, list[int]] = field(default_factory=dict)
    sweep_n: dict[str, int] = field(default_factory=dict)
    matmul_size: int = 8192
    correctness_images: int = 4
    correctness_n: int = 10_000
    train_steps: int = 300
    train_batch: int = 256
    train_subset: int = 10_000
    shard_target: int = 10_000
    compile_variants: bool = True


def full_plan(models: list[str]) -> Plan:
    sweep = {
        "cifar_resnet110": [512, 1024, 2048, 4096, 8192],
        "cifar_resnet20": [512, 2048, 4096, 8192],
        "resnet50": [128, 256, 512],
    }
    sweep_n = {"cifar_resnet110": 16_384, "cifar_resnet20": 32_768, "resnet50": 4096}
    return Plan(
        models=models,
        sweep={m: sweep.get(m, [512, 1024]) for m in models},
        sweep_n={m: sweep_n.get(m, 8192) for m in models},
    )


def quick_plan(models: list[str]) -> Plan:
    """The sizes of the one prepared device call (benchmarks/device_check.sh): the same n0 + n and
    correctness sizes as the full plan, two sweep points, eager only (compilation takes minutes)."""
    plan = full_plan(models)
    quick = {"cifar_resnet110": [1024, 4096], "cifar_resnet20": [2048, 8192], "resnet50": [256, 512]}
    plan.sweep = {m: quick.get(m, plan.sweep[m][:2]) for m in models}
    plan.compile_variants = False
    return plan


def smoke_plan(models: list[str]) -> Plan:
    return Plan(
        models=models,
        n=256,
        n0=16,
        sweep={m: [32, 64] for m in models},
        sweep_n={m: 64 for m in models},
        matmul_size=128,
        correctness_images=2,
        correctness_n=96,
        train_steps=2,
        train_batch=16,
        train_subset=64,
        shard_target=100,
        compile_variants=False,
    )


# ----------------------------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), seconds)`` with the device synchronized before and after."""
    synchronize(device)
    began = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - began


def matmul_tflops(device: torch.device, size: int, repeat: int = 10) -> float:
    """Measured bf16 matmul rate (TFLOP/s) of a size x size x size product on ``device`` (median of runs)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    torch.matmul(a, b)  # warm-up (handle creation, kernel choice)
    times = [timed(lambda: torch.matmul(a, b), device)[1] for _ in range(repeat)]
    return 2 * size**3 / float(np.median(times)) / 1e12


def flops_per_image(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter: 2 x multiply-accumulates)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


def fast_settings(device: torch.device) -> dict[str, Any]:
    """bf16 autocast where it is native (GPU with bf16, or a CPU with AVX512-BF16/AMX), channels_last."""
    from adre_ray.smoothing.sampler import fast_bf16_available

    return {"amp_dtype": torch.bfloat16 if fast_bf16_available(device) else None, "channels_last": True}


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).replace("torch.", "")


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` updated by ``new``; dict values are merged key by key (recursively), others replaced."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_results(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Merge ``new`` into the JSON at ``path`` (created if absent) atomically; returns the merged dict."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = merge(old, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return merged


# ------------------------------------------------------------------------------------------- correctness


def noise_is_batch_invariant(
    device: torch.device, shape: tuple[int, ...], batches: list[int]
) -> dict[str, Any]:
    """The noisy inputs of one shard (2 blocks + 37 draws: block edges and a partial block) for several
    batch sizes, compared bit for bit."""
    num = 2 * noise_block(shape) + 37
    x = torch.rand(shape, device=device)
    seed = noise_seed(0, 3, 1, MAIN_STREAM)
    noise = default_noise(device)
    streams = []
    for batch in batches:
        sizes = _noise_batch_sizes(shape, num, batch)
        fill = _noise_filler(noise, seed, device)
        parts = [
            noisy[:size].clone()
            for noisy, size in zip(_noise_batches(x, num, SIGMA, batch, fill, True, True), sizes, strict=True)
        ]
        streams.append(torch.cat(parts))
    identical = all(torch.equal(streams[0], other) for other in streams[1:])
    report = {"num": num, "batch_sizes": batches, "generator": noise, "noise_identical": bool(identical)}
    if noise == "philox":  # the values are those of (key, position): no launch shape can change them
        want = x + SIGMA * philox_normal(seed, 0, num * x.numel(), device).view(num, *shape)
        report["philox_values_match_definition"] = bool(torch.allclose(streams[0], want, rtol=0, atol=1e-6))
    return report


def philox_checks(device: torch.device, shape: tuple[int, ...], repeat: int = 5,
                  values: int | None = None) -> dict[str, Any]:
    """Philox noise: the fused (compiled) kernel gives the eager ops' values bit for bit; the seconds per
    noise block (or ``values`` values) of Philox fused, Philox eager and torch's ``randn``."""
    from adre_ray.smoothing import noise as noise_module

    block = values or noise_block(shape) * math.prod(shape)
    key = noise_seed(0, 1, 2, MAIN_STREAM)
    pairs = torch.arange(0, block // 2, dtype=torch.int64, device=device)
    keys = torch.tensor(noise_module.round_keys(key), dtype=torch.int64, device=device)
    eager = noise_module._pair_normals(pairs, keys)
    fused = noise_module._fused_pair_normals(pairs, keys)
    out: dict[str, Any] = {"block_values": block, "fused_equals_eager": bool(torch.equal(eager, fused)),
                           "fused_available": noise_module._compiled_pair_normals not in (None, False)}
    buffer = torch.empty(block, device=device)
    generator = torch.Generator(device=device).manual_seed(key)
    for name, fn in (("philox_fused_s", lambda: noise_module._fused_pair_normals(pairs, keys)),
                     ("philox_eager_s", lambda: noise_module._pair_normals(pairs, keys)),
                     ("torch_randn_s", lambda: torch.randn(block, generator=generator, device=device,
                                                           out=buffer))):
        fn()
        out[name] = min(timed(fn, device)[1] for _ in range(repeat))
    return out


class Float32Reference:
    """Context: true fp32 for the baseline (TF32 off for matmuls and cuDNN convolutions), restored after."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def load_cifar(data_dir: str, split: str, count: int, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    from adre_ray.data import load_images

    return load_images("cifar10", data_dir, split, list(range(0, count * step, step)))


def train_like(
    model: torch.nn.Module,
    data_dir: str | None,
    plan: Plan,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> str:
    """A few SGD steps of Gaussian augmentation (sigma 0.25) on CIFAR-10, data held on the device, so the
    model's decisions depend on the input like a trained model's. Returns what was done, in words."""
    from adre_ray.training import build_loss, train_one_epoch

    if not data_dir or not Path(data_dir).exists():
        return "random init (no CIFAR-10 data found; pass --data-dir)"
    x, y = load_cifar(data_dir, "train", plan.train_subset)
    x, y = x.to(device), y.to(device)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(plan.train_steps):
        pick = torch.randint(x.shape[0], (plan.train_batch,), generator=generator).to(device)
        batches.append((x[pick], y[pick]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stats = train_one_epoch(
        model,
        batches,
        build_loss("gaussian", sigma=SIGMA),
        optimizer,
        None,
        device=device,
        epoch=0,
        amp_dtype=amp_dtype,
    )
    model.eval()
    return (
        f"{plan.train_steps} SGD steps (batch {plan.train_batch}, lr 0.05) of Gaussian augmentation "
        f"sigma {SIGMA} on {plan.train_subset} CIFAR-10 train images; last-epoch noisy train acc "
        f"{stats['train_acc_noise']:.2f}"
    )


def check_correctness(args: argparse.Namespace, plan: Plan, device: torch.device) -> dict[str, Any]:
    """Noise batch invariance, fp32 counts across batch sizes, and fp32 eager vs the fast path."""
    name = next((m for m in plan.models if default_dataset(m) == "cifar10"), plan.models[0])
    model, num_classes, size = make_model(
        name, "cifar10" if default_dataset(name) == "cifar10" else "imagenet", device, args.seed
    )
    settings = fast_settings(device)
    report: dict[str, Any] = {"model": name}
    batches = plan.sweep[name][:3]
    report["noise"] = noise_is_batch_invariant(device, (3, size, size), batches)
    if device.type == "cuda" or args.smoke:
        report["philox"] = (philox_checks(device, (3, size, size), repeat=1, values=2**14) if args.smoke
                            else philox_checks(device, (3, size, size)))
    report["trained"] = train_like(model, args.data_dir, plan, device, settings["amp_dtype"])
    model.eval()
    if args.data_dir and Path(args.data_dir).exists() and size == 32:
        images, labels = load_cifar(args.data_dir, "test", plan.correctness_images, step=20)
    else:
        images = torch.rand(
            plan.correctness_images, 3, size, size, generator=torch.Generator().manual_seed(1)
        )
        labels = torch.zeros(plan.correctness_images, dtype=torch.int64)
    # fp32 eager counts across batch sizes (same noise; the model's rounding may depend on the batch shape)
    with Float32Reference():
        counts_by_batch = [
            sample_counts(
                model, images[0], plan.correctness_n, num_classes, SIGMA, batch_size=b, seed=args.seed, idx=0
            ).numpy()
            for b in batches
        ]
    diffs = [int(np.abs(counts_by_batch[0] - c).sum()) for c in counts_by_batch[1:]]
    report["fp32_counts_across_batch_sizes"] = {
        "n": plan.correctness_n,
        "batch_sizes": batches,
        "max_abs_count_difference_sum": max(diffs, default=0),
    }
    candidates = (
        ["cuda_graphs", "compile"]
        if (device.type == "cuda" and size == 32)
        else (["compile"] if device.type == "cuda" else [])
    ) if plan.compile_variants else []
    batch = plan.sweep[name][-1]
    fast_options = {**settings, "pad_batches": True}
    variant, fast_model, failures = "eager", model, {}
    for candidate in candidates:  # the first fast path that runs here (a failure is reported)
        try:
            net = prepare_model(
                copy.deepcopy(model),
                channels_last=True,
                compile=candidate == "compile",
                cuda_graphs=candidate == "cuda_graphs",
            )
            sample_counts(net, images[0].to(device), 1, num_classes, SIGMA, batch_size=batch, **fast_options)
        except Exception as err:
            failures[candidate] = f"{type(err).__name__}: {err}"[:500]
            continue
        variant, fast_model = candidate, net
        break
    if variant == "eager":
        fast_model = prepare_model(copy.deepcopy(model), channels_last=True)
    report["fast_path_failures"] = failures
    rows = []
    for i in range(images.shape[0]):
        x = images[i].to(device)
        per = {}
        for which, net, options in (
            ("fp32_eager", model, {}),
            ("fast", fast_model, {**settings, "pad_batches": variant != "eager"}),
        ):
            precision = Float32Reference() if which == "fp32_eager" else contextlib.nullcontext()
            with precision:
                pilot, main = certify_draws(net, x, plan, num_classes, batch, args.seed, i, options)
            per[which] = (pilot, main, certify_counts(pilot, main, SIGMA, ALPHA))
        (_, a, ca), (_, b, cb) = per["fp32_eager"], per["fast"]
        rows.append(
            {
                "idx": i,
                "label": int(labels[i]),
                "class_fp32": int(ca.predict),
                "class_fast": int(cb.predict),
                "total_variation": float(np.abs(a - b).sum() / (2 * plan.correctness_n)),
                "pA_lower_difference": float(abs(ca.pA_lower - cb.pA_lower)),
                "radius_fp32": float(ca.radius),
                "radius_fast": float(cb.radius),
            }
        )
    agreement = sum(r["class_fp32"] == r["class_fast"] for r in rows) / len(rows)
    report["fast_vs_fp32"] = {
        "fast_settings": f"{dtype_name(settings['amp_dtype'])} + channels_last + {variant}",
        "baseline": "fp32, TF32 off",
        "batch_size": batch,
        "n0": plan.n0,
        "n": plan.correctness_n,
        "images": rows,
        "class_agreement_rate": agreement,
        "max_total_variation": max(r["total_variation"] for r in rows),
        "max_pA_lower_difference": max(r["pA_lower_difference"] for r in rows),
    }
    # Pass: the noise contract. Classes may differ near a decision boundary (two valid base classifiers),
    # so their agreement is a reported rate, not a pass condition.
    philox = report.get("philox", {})
    report["passed"] = bool(report["noise"]["noise_identical"]
                            and report["noise"].get("philox_values_match_definition", True)
                            and philox.get("fused_equals_eager", True))
    return report


def certify_draws(net: torch.nn.Module, x: torch.Tensor, plan: Plan, num_classes: int, batch: int, seed: int,
                  idx: int, options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(pilot counts, main counts) of one image, as CERTIFY draws them."""
    common = dict(batch_size=batch, seed=seed, idx=idx, **options)
    pilot = sample_counts(net, x, plan.n0, num_classes, SIGMA, stream=PILOT_STREAM, **common).numpy()
    main = sample_counts(net, x, plan.correctness_n, num_classes, SIGMA, **common).numpy()
    return pilot, main


# ---------------------------------------------------------------------------------------------- certify


@dataclass
class ModelTiming:
    model: str
    image_size: int
    flops: float
    sweep_ours: dict[int, float] = field(default_factory=dict)  # batch -> samples/s (eager fast)
    sweep_reference: dict[int, float] = field(default_factory=dict)  # batch -> samples/s
    variants: dict[str, float] = field(default_factory=dict)  # variant -> samples/s at best batch
    compile_s: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # variant -> error (not timed)
    best_batch: int = 0
    best_variant: str = "eager"
    ours_s_per_image: float = math.nan
    reference_s_per_image: float = math.nan
    worker_s_per_image: float = math.nan
    worker_settings: dict[str, Any] = field(default_factory=dict)


def time_model(
    name: str, args: argparse.Namespace, plan: Plan, device: torch.device, tflops: float, sections: set[str]
) -> ModelTiming:
    dataset = default_dataset(name)
    model, num_classes, size = make_model(name, dataset, device, args.seed)
    model.eval()
    result = ModelTiming(model=name, image_size=size, flops=flops_per_image(model, size, device))
    x = torch.rand(3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    settings = fast_settings(device)
    fast = prepare_model(copy.deepcopy(model), channels_last=True)
    sweep_n = plan.sweep_n[name]

    def rate(fn: Callable[[], Any], num: int) -> float:
        fn()  # warm-up (cuDNN autotuning, allocator)
        return num / min(timed(fn, device)[1] for _ in range(args.repeat))

    if "certify" in sections:
        for batch in plan.sweep[name]:
            result.sweep_ours[batch] = rate(
                lambda b=batch: sample_counts(
                    fast, x, sweep_n, num_classes, SIGMA, batch_size=b, seed=args.seed, **settings
                ),
                sweep_n,
            )
            result.sweep_reference[batch] = rate(
                lambda b=batch: reference_counts(model, x, sweep_n, num_classes, SIGMA, b), sweep_n
            )
            print(
                f"  {name} batch {batch}: ours {result.sweep_ours[batch]:.0f} samples/s, reference "
                f"{result.sweep_reference[batch]:.0f} samples/s",
                flush=True,
            )
        if REFERENCE_BATCH not in result.sweep_reference:
            result.sweep_reference[REFERENCE_BATCH] = rate(
                lambda: reference_counts(model, x, sweep_n, num_classes, SIGMA, REFERENCE_BATCH), sweep_n
            )
        result.best_batch = max(result.sweep_ours, key=result.sweep_ours.get)
    else:
        result.best_batch = args.batch_size or plan.sweep[name][-1]
    batch = effective_batch_size(result.best_batch, (3, size, size))
    result.best_batch = batch
    nets: dict[str, torch.nn.Module] = {"eager": fast}
    if plan.compile_variants and "certify" in sections:
        nets["compile"] = prepare_model(copy.deepcopy(model), channels_last=True, compile=True)
        if device.type == "cuda" and dataset == "cifar10":
            nets["cuda_graphs"] = prepare_model(copy.deepcopy(model), channels_last=True, cuda_graphs=True)
    if "certify" in sections:
        for variant, net in nets.items():
            pad = variant != "eager"

            def ours(net: torch.nn.Module = net, pad: bool = pad, num: int = sweep_n) -> Any:
                return sample_counts(
                    net,
                    x,
                    num,
                    num_classes,
                    SIGMA,
                    batch_size=batch,
                    seed=args.seed,
                    pad_batches=pad,
                    **settings,
                )

            try:  # compiles (one shape: padded batches)
                _, first = timed(lambda ours=ours: (ours(num=plan.n0), ours()), device)
            except Exception as err:  # an optional speed-up failing here is reported, not fatal
                result.failed[variant] = f"{type(err).__name__}: {err}"[:500]
                print(f"  {name} {variant} FAILED: {result.failed[variant]}", flush=True)
                continue
            result.compile_s[variant] = first
            result.variants[variant] = rate(ours, sweep_n)
            print(
                f"  {name} {variant} at batch {batch}: {result.variants[variant]:.0f} samples/s "
                f"(first call {first:.1f} s)",
                flush=True,
            )
        result.best_variant = max(result.variants, key=result.variants.get)
        net, pad = nets[result.best_variant], result.best_variant != "eager"

        def one_image(seed_idx: int) -> None:
            for stream, num in ((PILOT_STREAM, plan.n0), (MAIN_STREAM, plan.n)):
                sample_counts(
                    net,
                    x,
                    num,
                    num_classes,
                    SIGMA,
                    batch_size=batch,
                    seed=args.seed,
                    idx=seed_idx,
                    stream=stream,
                    pad_batches=pad,
                    **settings,
                )

        one_image(0)
        result.ours_s_per_image = min(timed(lambda i=i: one_image(i), device)[1] for i in range(1, 3))
        _, result.reference_s_per_image = timed(
            lambda: (
                reference_counts(model, x, plan.n0, num_classes, SIGMA, REFERENCE_BATCH),
                reference_counts(model, x, plan.n, num_classes, SIGMA, REFERENCE_BATCH),
            ),
            device,
        )
        print(
            f"  {name} one image at n0 + n = {plan.n0} + {plan.n}: ours {result.ours_s_per_image:.3f} s, "
            f"reference (batch {REFERENCE_BATCH}) {result.reference_s_per_image:.3f} s",
            flush=True,
        )
    if "worker" in sections:
        time_worker(result, model, name, dataset, num_classes, x, args, plan, device)
    return result


def time_worker(
    result: ModelTiming,
    model: torch.nn.Module,
    name: str,
    dataset: str,
    num_classes: int,
    x: torch.Tensor,
    args: argparse.Namespace,
    plan: Plan,
    device: torch.device,
) -> None:
    """One image through ``CertifyWorker`` as the job runs it: the pilot in one shard, n in shards."""
    from adre_ray.distributed.worker import CertifyWorker
    from adre_ray.models.checkpoint import save_model_checkpoint

    batch = result.best_batch
    variant = result.best_variant if plan.compile_variants else "eager"
    shard = max(batch, round(plan.shard_target / batch) * batch)  # a multiple of the batch: no padded tail
    settings = fast_settings(device)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_model_checkpoint(
            Path(folder) / "model.pt", model, model_name=name, num_classes=num_classes, dataset=dataset
        )
        worker = CertifyWorker(
            str(checkpoint),
            num_classes=num_classes,
            sigma=SIGMA,
            seed=args.seed,
            batch_size=batch,
            device=device.type,
            precision="bf16" if settings["amp_dtype"] is not None else "fp32",
            channels_last=True,
            compile=variant == "compile",
            cuda_graphs=variant == "cuda_graphs",
        )
        image = x.cpu().numpy()  # the job ships images as arrays

        def one_image(idx: int) -> np.ndarray:
            total = worker.count(image, idx, PILOT_STREAM, 0, plan.n0)
            for s, start in enumerate(range(0, plan.n, shard)):
                total = total + worker.count(image, idx, MAIN_STREAM, s, min(shard, plan.n - start))
            return total

        one_image(0)  # warm-up: compiles / captures every shape
        result.worker_s_per_image = min(timed(lambda i=i: one_image(i), device)[1] for i in range(1, 3))
    result.worker_settings = {
        "batch_size": batch,
        "shard_size": shard,
        "variant": variant,
        "amp": settings["amp_dtype"] is not None,
        "channels_last": True,
    }
    print(
        f"  {name} CertifyWorker one image: {result.worker_s_per_image:.3f} s "
        f"(batch {batch}, shards of {shard}, {variant})",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------- output


def floor_s(timing: ModelTiming, plan: Plan, tflops: float) -> float:
    return (plan.n0 + plan.n) * timing.flops / (tflops * 1e12)


def results_json(
    env: dict[str, Any],
    timings: list[ModelTiming],
    correctness: dict[str, Any] | None,
    plan: Plan,
    sections: set[str],
    command: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        **env,
        "noise_scheme": env["noise_scheme"],
        "n": plan.n,
        "n0": plan.n0,
        "commands": {"gpu_suite " + ",".join(sorted(sections)): command},
    }
    for key in (
        "certify_s_per_image",
        "reference_s_per_image",
        "flop_floor_s_per_image",
        "samples_per_s",
        "batch_size",
        "settings",
        "flops_per_image",
        "worker_s_per_image",
        "ratio_to_floor",
        "speedup_vs_reference",
        "sweep",
    ):
        out[key] = {}
    for t in timings:
        floor = floor_s(t, plan, env["matmul_bf16_tflops"])
        out["flops_per_image"][t.model] = t.flops
        out["flop_floor_s_per_image"][t.model] = floor
        if "certify" in sections:
            out["certify_s_per_image"][t.model] = t.ours_s_per_image
            out["reference_s_per_image"][t.model] = t.reference_s_per_image
            out["ratio_to_floor"][t.model] = t.ours_s_per_image / floor
            out["speedup_vs_reference"][t.model] = t.reference_s_per_image / t.ours_s_per_image
            out["samples_per_s"][t.model] = {
                "ours": (plan.n0 + plan.n) / t.ours_s_per_image,
                "reference_batch_400": t.sweep_reference[REFERENCE_BATCH],
                **{f"ours_{k}": v for k, v in t.variants.items()},
            }
            out["batch_size"][t.model] = t.best_batch
            out["settings"][t.model] = {
                "ours": f"{env['fast_dtype']} + channels_last + {t.best_variant}",
                "reference": f"fp32, batch {REFERENCE_BATCH}, repeat + randn_like, Python count loop",
                "compile_first_call_s": t.compile_s,
                "failed_variants": t.failed,
            }
            out["sweep"][t.model] = {
                "ours_eager": {str(k): v for k, v in t.sweep_ours.items()},
                "reference": {str(k): v for k, v in t.sweep_reference.items()},
            }
        if "worker" in sections:
            out["worker_s_per_image"][t.model] = t.worker_s_per_image
            out["settings"].setdefault(t.model, {})["worker"] = t.worker_settings
    if correctness is not None:
        out["correctness"] = correctness
    return {key: value for key, value in out.items() if value != {}}


def markdown(
    env: dict[str, Any],
    timings: list[ModelTiming],
    correctness: dict[str, Any] | None,
    plan: Plan,
    sections: set[str],
    command: str,
) -> str:
    lines = [
        f"### GPU suite: {env['device']} | torch {env['torch']} | {env['date']}",
        "",
        f"Command: `{command}`",
        "",
        f"bf16 matmul rate measured in the same run: {env['matmul_bf16_tflops']:.1f} TFLOP/s "
        f"({plan.matmul_size}^3). Noise scheme {env['noise_scheme']}. n0 + n = {plan.n0} + {plan.n}.",
        "",
    ]
    if timings and "certify" in sections:
        lines += [
            "| model | ours s/image | reference s/image (batch 400) | ours / reference speed-up | "
            "FLOP floor s/image | ours / floor | best batch, settings | CertifyWorker s/image |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in timings:
            floor = floor_s(t, plan, env["matmul_bf16_tflops"])
            lines.append(
                f"| {t.model} ({t.image_size}x{t.image_size}, {t.flops / 1e9:.2f} GFLOP) | "
                f"{t.ours_s_per_image:.3f} | {t.reference_s_per_image:.3f} | "
                f"{t.reference_s_per_image / t.ours_s_per_image:.1f}x | {floor:.3f} | "
                f"{t.ours_s_per_image / floor:.1f}x | {t.best_batch}, {env['fast_dtype']} + "
                f"channels_last + {t.best_variant} | {t.worker_s_per_image:.3f} |"
            )
        lines += ["", "Batch sweep (samples/s; ours = eager " + env["fast_dtype"] + " + channels_last):", ""]
        for t in timings:
            cells = ", ".join(
                f"{b}: {t.sweep_ours[b]:.0f} / {t.sweep_reference[b]:.0f}" for b in t.sweep_ours
            )
            variants = ", ".join(f"{k} {v:.0f}" for k, v in t.variants.items())
            lines.append(
                f"- {t.model}: batch: ours / reference = {cells}; at batch {t.best_batch}: {variants}"
            )
    elif timings and "worker" in sections:
        lines += [
            f"- {t.model}: CertifyWorker {t.worker_s_per_image:.3f} s/image ({t.worker_settings})"
            for t in timings
        ]
    if correctness is not None:
        noise, fast = correctness["noise"], correctness["fast_vs_fp32"]
        lines += [
            "",
            f"Correctness ({correctness['model']}, {correctness['trained']}):",
            f"- noise of a {noise['num']}-draw shard bit-identical for batch sizes {noise['batch_sizes']}: "
            f"{noise['noise_identical']}",
            f"- fp32 eager counts across those batch sizes: sum |difference| <= "
            f"{correctness['fp32_counts_across_batch_sizes']['max_abs_count_difference_sum']} of "
            f"n = {correctness['fp32_counts_across_batch_sizes']['n']}",
            f"- fast path ({fast['fast_settings']}) vs fp32 eager, same noise, {len(fast['images'])} test "
            f"images, n = {fast['n']}: CERTIFY class agreement {fast['class_agreement_rate']:.2f} (fp32 "
            "baseline with TF32 off; a class may differ near a decision boundary);"
            f" max total variation of the counts {fast['max_total_variation']:.4f}; max |pA_lower "
            f"difference| {fast['max_pA_lower_difference']:.4f}",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU; writes into a temp folder")
    parser.add_argument("--quick", action="store_true",
                        help="the one-call device plan: two batch sizes per model, no compile variants, "
                             "repeat 2 (the n = 100,000 figures are the same measurement)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument(
        "--models", default=None, help="comma-separated (default cifar_resnet110,resnet50; smoke: small_cnn)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 Parquet (correctness section)")
    parser.add_argument(
        "--out", default=None, help=f"results JSON (default {DEFAULT_OUT}; smoke: a temp file)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="worker batch when certify is not run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per rate (the fastest is kept)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (smoke)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown or not args.sections:
        parser.error(f"--only={args.only!r}: choose from {','.join(SECTIONS)}")
    if args.repeat < 1:
        parser.error(f"--repeat={args.repeat}: must be >= 1")
    default_models = "small_cnn" if args.smoke else "cifar_resnet110,resnet50"
    args.model_list = [m.strip() for m in (args.models or default_models).split(",") if m.strip()]
    if args.smoke and args.out and Path(args.out).resolve() == DEFAULT_OUT:
        parser.error(f"--out={args.out!r}: --smoke never writes the real results file")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = pick_device("cpu" if (args.smoke and args.device == "auto") else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_numerics(device)  # the workers' settings: cuDNN autotuning on GPU
    plan = (smoke_plan(args.model_list) if args.smoke
            else quick_plan(args.model_list) if args.quick else full_plan(args.model_list))
    out = (
        Path(args.out)
        if args.out
        else (
            Path(tempfile.mkdtemp(prefix="gpu_suite_smoke_")) / "gpu_results.json"
            if args.smoke
            else DEFAULT_OUT
        )
    )
    command = "python benchmarks/gpu_suite.py " + " ".join(argv)
    settings = fast_settings(device)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({device})",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fast_dtype": dtype_name(settings["amp_dtype"]),
        "smoke": bool(args.smoke),
        "noise_scheme": noise_scheme(default_noise(device)),
    }
    env["matmul_bf16_tflops"] = matmul_tflops(device, plan.matmul_size)
    print(
        f"{env['device']} | torch {env['torch']} | bf16 matmul {env['matmul_bf16_tflops']:.1f} TFLOP/s",
        flush=True,
    )
    correctness = None
    if "correctness" in args.sections:
        correctness = check_correctness(args, plan, device)
        write_results(out, results_json(env, [], correctness, plan, args.sections, command))  # partial
    timings = []
    if args.sections & {"certify", "worker"}:
        for name in plan.models:
            timings.append(time_model(name, args, plan, device, env["matmul_bf16_tflops"], args.sections))
            write_results(out, results_json(env, timings, correctness, plan, args.sections, command))
    merged = write_results(out, results_json(env, timings, correctness, plan, args.sections, command))
    print(f"results merged into {out} ({len(merged)} keys)")
    print()
    print(markdown(env, timings, correctness, plan, args.sections, command))
    if correctness is not None and not correctness["passed"]:
        print("CORRECTNESS CHECK FAILED (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
