"""Randomized smoothing core (no Ray): noise sampler, confidence bounds, PREDICT / CERTIFY / T-CERTIFY.

Notebook use::

    from adre_ray.smoothing import SmoothedClassifier
    smoothed = SmoothedClassifier(model.eval(), num_classes=10, sigma=0.25)
    cert = smoothed.certify(x, n0=100, n=100_000, alpha=0.001, idx=0)
    cert.certify.radius, cert.tcertify.radius

Names are imported on first use (``adre_ray.lazy``): ``adre_ray.smoothing.params`` (the vocabulary and
the one check of sigma, alpha, n) imports without torch.
"""

from adre_ray.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("PB_BOUNDS", "cp_upper", "pA_lower", "pB_upper", "pB_upper_max"), "bounds"),
    **dict.fromkeys(("DEFAULT_GRID", "MAX_SIGMA", "TCERTIFY_MODES", "check_alpha", "check_draws",
                     "check_grid", "check_sigma"), "params"),
    **dict.fromkeys(("ABSTAIN", "SmoothingResult", "bonferroni_level", "certify_counts", "pilot_choice",
                     "predict_counts", "split_margin", "split_radius", "tcertify_counts"), "certify"),
    **dict.fromkeys(("MAIN_STREAM", "NOISE_BLOCK_ELEMENTS", "NOISE_GENERATORS", "NOISE_SCHEME",
                     "PHILOX_NOISE_SCHEME", "PILOT_STREAM", "NonFiniteLogitsError", "default_noise",
                     "effective_batch_size", "fast_bf16_available", "model_device", "noise_block",
                     "noise_scheme", "noise_seed", "prepare_model", "sample_counts"), "sampler"),
    **dict.fromkeys(("Certification", "SmoothedClassifier"), "smoothed"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
