"""Checkpoint formats ``adre-ray import-checkpoint`` reads (``adre_ray.models.importers``); plain Python."""

IMPORT_FORMATS = ("smoothing", "torchvision")
"""smoothing: {arch, state_dict, ...} of the randomized-smoothing code; torchvision: a plain state dict."""
