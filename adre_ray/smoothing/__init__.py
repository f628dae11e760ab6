"""Randomized smoothing core (no Ray): noise sampler, confidence bounds, PREDICT / CERTIFY / T-CERTIFY.

Notebook use::

    from adre_ray.smoothing import SmoothedClassifier
    smoothed = SmoothedClassifier(model.eval(), num_classes=10, sigma=0.25)
    cert = smoothed.certify(x, n0=100, n=100_000, alpha=0.001, idx=0)
    cert.certify.radius, cert.tcertify.radius
"""

from adre_ray.smoothing.bounds import PB_BOUNDS, cp_upper, pA_lower, pB_upper, pB_upper_max
from adre_ray.smoothing.certify import (
    ABSTAIN,
    DEFAULT_GRID,
    TCERTIFY_MODES,
    SmoothingResult,
    bonferroni_level,
    certify_counts,
    pilot_choice,
    predict_counts,
    split_margin,
    split_radius,
    tcertify_counts,
)
from adre_ray.smoothing.sampler import (
    MAIN_STREAM,
    NOISE_BLOCK_ELEMENTS,
    NOISE_GENERATORS,
    NOISE_SCHEME,
    PHILOX_NOISE_SCHEME,
    PILOT_STREAM,
    NonFiniteLogitsError,
    default_noise,
    effective_batch_size,
    fast_bf16_available,
    model_device,
    noise_block,
    noise_scheme,
    noise_seed,
    prepare_model,
    sample_counts,
)
from adre_ray.smoothing.smoothed import Certification, SmoothedClassifier

__all__ = [
    "ABSTAIN", "DEFAULT_GRID", "MAIN_STREAM", "NOISE_BLOCK_ELEMENTS", "NOISE_GENERATORS", "NOISE_SCHEME",
    "PB_BOUNDS", "PHILOX_NOISE_SCHEME", "PILOT_STREAM", "TCERTIFY_MODES", "NonFiniteLogitsError",
    "pB_upper_max", "Certification", "SmoothedClassifier", "SmoothingResult", "bonferroni_level",
    "certify_counts", "cp_upper", "default_noise", "effective_batch_size", "fast_bf16_available",
    "model_device", "noise_block", "noise_scheme", "noise_seed", "prepare_model", "pA_lower", "pB_upper",
    "pilot_choice", "predict_counts", "sample_counts", "split_margin", "split_radius", "tcertify_counts",
]
