"""Approximate certified accuracy on a held-out validation subset: the objective of a hyper-parameter search.

For each validation image (index i, label y_i) the smoothed classifier is certified exactly as the
certification job does it (``adre_ray.smoothing``): n0 pilot draws pick cA, n independent draws give
N_A, and CERTIFY (Cohen) and T-CERTIFY (``mode``) turn the same counts into (class, radius). Then

    approx_cert_acc_at_<r> = #{i : class_i = y_i and radius_i >= r} / N
    approx_acr             = sum_i radius_i [class_i = y_i] / N
    approx_abstain         = #{i : abstained} / N

and the same three with ``approx_tcert_`` for T-CERTIFY. Every radius is still a valid certificate at
level alpha, but with a small n (hundreds to a few thousand draws, not the 100,000 of the paper) pA_lower
is looser, so radii and accuracies are LOWER than a full certification of the same model would report,
and with a few hundred images the accuracy carries a sampling error of about sqrt(p (1 - p) / N).
Hence the ``approx_`` prefix: the numbers rank trials; they are not the paper's figures.

Held out: the images come from the train split rows NOT used for training (``holdout_indices``), or from
the test split when the user asks for it (then the search has seen the test set: say so when reporting).

Pure PyTorch + NumPy: no Ray here. The Ray train loop calls these functions on its workers.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adre_ray.data import build_dataset, dataset_labels, load_images, stratified_subset_indices
from adre_ray.smoothing import DEFAULT_GRID, TCERTIFY_MODES, SmoothedClassifier
from adre_ray.training.modes import eval_mode

PREFIX = "approx_"
VALIDATION_SPLITS = ("holdout", "test")
"""``holdout``: train-split rows not in the training subset; ``test``: the test split."""


def radius_metric(method: str, r: float) -> str:
    """Metric name of certified accuracy at radius ``r``: ``approx_cert_acc_at_0.50`` (CERTIFY) or
    ``approx_tcert_acc_at_0.50`` (T-CERTIFY). ``_at_`` stands for '@', which MLflow rejects in names."""
    return f"{PREFIX}{_METHOD_TAG[method]}acc_at_{r:.2f}"


_METHOD_TAG = {"certify": "cert_", "tcertify": "tcert_"}


def metric_names(radii: Sequence[float]) -> list[str]:
    """All keys ``summarize_validation`` returns for ``radii``, in order."""
    names: list[str] = []
    for method in ("certify", "tcertify"):
        tag = "" if method == "certify" else "tcert_"
        names += [radius_metric(method, r) for r in radii]
        names += [f"{PREFIX}{tag}acr", f"{PREFIX}{tag}abstain"]
    return names + [f"{PREFIX}num_images"]


@dataclass(frozen=True)
class ValidationRecords:
    """Per-image outcome (one entry per validation image, in input order); ``-1`` marks an abstention."""

    index: np.ndarray           # noise index of each image (its row in the split)
    label: np.ndarray
    certify_predict: np.ndarray
    certify_radius: np.ndarray
    tcertify_predict: np.ndarray
    tcertify_radius: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[ValidationRecords]) -> ValidationRecords:
        """The records of several shards (e.g. one per DDP rank) as one, sorted by ``index``."""
        if not parts:
            raise ValueError("parts=[]: need at least one set of validation records")
        cols = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _RECORD_FIELDS}
        order = np.argsort(cols["index"], kind="stable")
        return ValidationRecords(**{name: values[order] for name, values in cols.items()})


_RECORD_FIELDS = ("index", "label", "certify_predict", "certify_radius", "tcertify_predict",
                  "tcertify_radius")


def _check_radii(radius: float | Sequence[float]) -> tuple[float, ...]:
    values = (radius,) if isinstance(radius, numbers.Real) else tuple(radius)
    if not values:
        raise ValueError(f"radius={radius!r}: need at least one radius")
    for r in values:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (math.isfinite(r) and r >= 0):
            raise ValueError(f"radius={radius!r}: {r!r} is not a finite number >= 0")
    return tuple(float(r) for r in values)


def _check_int(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    return int(value)


def _checked_inputs(images: Any, labels: torch.Tensor | Sequence[int], indices: Sequence[int] | None,
                    draws: tuple[int, int, int], mode: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(labels, noise indices)`` as int64 arrays, one per image of ``images`` (N, C, H, W), and
    ``draws`` = (n0, n, seed) checked; ValueError naming the argument otherwise."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images={shape}: expected a tensor (N, C, H, W)")
    label_arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if label_arr.shape != (images.shape[0],):
        raise ValueError(f"labels: {label_arr.shape[0] if label_arr.ndim else 0} entries for "
                         f"{images.shape[0]} images: must match")
    if images.shape[0] == 0:
        raise ValueError("images: no validation images (empty input)")
    n0, n, seed = draws
    draws = (_check_int("n0", n0, 1), _check_int("n", n, 1), _check_int("seed", seed, 0))
    if mode not in TCERTIFY_MODES:
        raise ValueError(f"mode={mode!r}: must be one of {', '.join(TCERTIFY_MODES)}")
    idx_arr = np.arange(images.shape[0], dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if idx_arr.shape != label_arr.shape:
        raise ValueError(f"indices: {idx_arr.size} entries for {images.shape[0]} images: must match")
    return label_arr, idx_arr, draws


def certify_images(  # 16 parameters one a line (the certification knobs), then ~25 lines of body
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int = 1000,
    seed: int = 0,
    mode: str = "pilot",
    grid: Sequence[float] = DEFAULT_GRID,
    num_classes: int | None = None,
    indices: Sequence[int] | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> ValidationRecords:
    """CERTIFY and T-CERTIFY of each image from the same n0 pilot and n estimation draws.

    ``images`` is (N, C, H, W) in [0, 1] pixel space; ``indices`` are the noise indices (default 0..N-1;
    pass the images' rows in their split so the noise of an image does not depend on how the set was cut
    into shards). The model runs in eval mode; its previous train/eval mode is restored.
    Each non-abstaining (class, radius) is a certificate valid with probability >= 1 - alpha (T-CERTIFY:
    for ``mode`` in pilot / bonferroni; ``paper`` only at alpha (t_max + 1 - t_min)).
    """
    label_arr, idx_arr, (n0, n, seed) = _checked_inputs(images, labels, indices, (n0, n, seed), mode)
    with eval_mode(model):
        if num_classes is None:
            with torch.inference_mode():
                probe = images[:1].to(next(iter(model.parameters()), images).device)
                num_classes = int(model(probe).shape[1])
        smoothed = SmoothedClassifier(model, num_classes, sigma, batch_size=batch_size, amp_dtype=amp_dtype,
                                      channels_last=channels_last)
        rows = []
        for x, idx in zip(images, idx_arr, strict=True):
            cert = smoothed.certify(x, n0, n, alpha, seed=seed, idx=int(idx), mode=mode, grid=grid)
            c, t = cert.certify, cert.tcertify
            rows.append((c.predict, c.radius, t.predict, t.radius))
    cols = np.asarray(rows, dtype=np.float64).T
    return ValidationRecords(index=idx_arr, label=label_arr, certify_predict=cols[0].astype(np.int64),
                             certify_radius=cols[1], tcertify_predict=cols[2].astype(np.int64),
                             tcertify_radius=cols[3])


def summarize_validation(records: ValidationRecords, radius: float | Sequence[float]) -> dict[str, float]:
    """approx_{cert,tcert}_acc_at_<r>, approx_acr / approx_tcert_acr, approx_abstain / approx_tcert_abstain,
    approx_num_images (formulas in the module docstring; N = all images, abstentions count as wrong)."""
    radii = _check_radii(radius)
    total = records.label.size
    if total == 0:
        raise ValueError("records: no images (empty input)")
    out: dict[str, float] = {}
    for method in ("certify", "tcertify"):
        tag = "" if method == "certify" else "tcert_"
        predict, rad = getattr(records, f"{method}_predict"), getattr(records, f"{method}_radius")
        correct = predict == records.label  # an abstention (-1) never equals a label
        for r in radii:
            out[radius_metric(method, r)] = float(np.sum(correct & (rad >= r)) / total)
        out[f"{PREFIX}{tag}acr"] = float(np.sum(np.where(correct, rad, 0.0)) / total)
        out[f"{PREFIX}{tag}abstain"] = float(np.mean(predict < 0))
    out[f"{PREFIX}num_images"] = float(total)
    return out


def estimate_certified_accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    radius: float | Sequence[float],
    batch_size: int = 1000,
    seed: int = 0,
    mode: str = "pilot",
    grid: Sequence[float] = DEFAULT_GRID,
    num_classes: int | None = None,
    indices: Sequence[int] | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Approximate certified accuracy at ``radius`` (one or several), ACR and abstain rate of CERTIFY and
    T-CERTIFY on ``images``: ``summarize_validation(certify_images(...), radius)``. A small ``n`` gives a
    conservative ESTIMATE (see the module docstring), hence the ``approx_`` names."""
    radii = _check_radii(radius)
    records = certify_images(model, images, labels, sigma=sigma, n0=n0, n=n, alpha=alpha,
                             batch_size=batch_size, seed=seed, mode=mode, grid=grid, num_classes=num_classes,
                             indices=indices, amp_dtype=amp_dtype, channels_last=channels_last)
    return summarize_validation(records, radii)


def holdout_indices(num_rows: int | np.ndarray, used: Sequence[int] | np.ndarray | None, size: int,
                    seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """``size`` sorted row indices of a split that are NOT in ``used`` (the training subset's rows).

    With ``labels`` (all rows' labels) the choice is class-balanced (``stratified_subset_indices`` over
    the unused rows), otherwise a seeded uniform sample. Deterministic in (used, size, seed).
    ValueError if fewer than ``size`` rows are unused.
    """
    total = int(num_rows) if not isinstance(num_rows, np.ndarray) else int(num_rows.size)
    size = _check_int("validation.size", size, 1)
    seed = _check_int("validation.seed", seed, 0)
    mask = np.ones(total, dtype=bool)
    if used is not None:
        used_arr = np.asarray(used, dtype=np.int64)
        if used_arr.size and (used_arr.min() < 0 or used_arr.max() >= total):
            raise ValueError(f"used: row index outside [0, {total})")
        mask[used_arr] = False
    free = np.flatnonzero(mask)
    if free.size < size:
        raise ValueError(f"validation.size={size}: only {free.size} rows of the train split are not used for "
                         f"training (shrink the training subset or use validation.split=test)")
    if labels is not None:
        picked = stratified_subset_indices(np.asarray(labels, dtype=np.int64)[free], size, seed)
    else:
        picked = np.random.default_rng(seed).choice(free.size, size=size, replace=False)
    return np.sort(free[picked])


def validation_indices(dataset: str, data_dir: str | Path, *, split: str, size: int, seed: int,
                       train_subset: int | None, train_subset_seed: int, source: str = "auto") -> np.ndarray:
    """Rows of the validation images in their split (``train`` for ``split='holdout'``, else ``test``).

    ``holdout``: the training subset is ``stratified_subset_indices(train labels, train_subset,
    train_subset_seed)`` (what ``build_dataset(subset=..., subset_seed=...)`` trains on); the validation
    rows are a class-balanced sample of the remaining rows, so no validation image was trained on.
    ``train_subset=None`` means training uses the whole split: then no row is held out (ValueError).
    ``test``: a class-balanced sample of the test split.
    """
    if split not in VALIDATION_SPLITS:
        raise ValueError(f"validation.split={split!r}: must be one of {', '.join(VALIDATION_SPLITS)}")
    if split == "test":
        labels = dataset_labels(build_dataset(dataset, data_dir, "test", source=source, augment=False))
        return stratified_subset_indices(labels, _check_int("validation.size", size, 1),
                                         _check_int("validation.seed", seed, 0))
    labels = dataset_labels(build_dataset(dataset, data_dir, "train", source=source, augment=False))
    if train_subset is None:
        raise ValueError("validation.split='holdout': training uses the whole train split, so no image is "
                         "held out; set a training subset (data.subset) or validation.split=test")
    used = stratified_subset_indices(labels, train_subset, train_subset_seed)
    return holdout_indices(labels.size, used, size, seed, labels=labels)


def load_validation_set(dataset: str, data_dir: str | Path, *, split: str, size: int, seed: int,
                        train_subset: int | None, train_subset_seed: int, source: str = "auto"
                        ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(images (N, C, H, W) in [0, 1] with the eval transform, labels, row indices) of the validation set."""
    rows = validation_indices(dataset, data_dir, split=split, size=size, seed=seed, train_subset=train_subset,
                              train_subset_seed=train_subset_seed, source=source)
    disk_split = "train" if split == "holdout" else "test"
    images, labels = load_images(dataset, data_dir, disk_split, rows.tolist(), source=source)
    return images, labels, rows


def run_validation(model: torch.nn.Module, validation: Any, data: Any, sigma: float, *, rank: int = 0,
                   world_size: int = 1, amp_dtype: torch.dtype | None = None, channels_last: bool = False
                   ) -> dict[str, float]:
    """The certified validation of a training run: ``validation`` is a ``ValidationSection``, ``data`` the
    train config's ``DataSection`` (dataset, data_dir, source, train_subset, subset_seed).

    With ``world_size`` > 1 (DDP), rank r certifies the validation rows r, r + world_size, ...; the
    per-image records are gathered with ``torch.distributed.all_gather_object`` and every rank returns
    the same metrics. Noise is indexed by each image's row, so the result does not depend on
    ``world_size``. Adds ``validation_time_s`` (wall time of this call).
    """
    start = time.perf_counter()
    rows = validation_indices(data.dataset, data.data_dir, split=validation.split, size=validation.size,
                              seed=validation.seed, train_subset=data.train_subset,
                              train_subset_seed=data.subset_seed, source=data.source)
    mine = rows[rank::world_size]
    disk_split = "train" if validation.split == "holdout" else "test"
    parts: list[ValidationRecords] = []
    if mine.size:
        images, labels = load_images(data.dataset, data.data_dir, disk_split, mine.tolist(),
                                     source=data.source)
        parts.append(certify_images(model, images, labels, sigma=sigma, n0=validation.n0, n=validation.n,
                                    alpha=validation.alpha, batch_size=validation.batch_size,
                                    seed=validation.seed, mode=validation.mode, indices=mine,
                                    amp_dtype=amp_dtype, channels_last=channels_last))
    if world_size > 1:
        import torch.distributed as dist

        gathered: list[list[ValidationRecords] | None] = [None] * world_size
        dist.all_gather_object(gathered, parts)
        parts = [part for group in gathered for part in (group or [])]
    metrics = summarize_validation(ValidationRecords.concatenate(parts), validation.radius)
    metrics["validation_time_s"] = time.perf_counter() - start
    return metrics
