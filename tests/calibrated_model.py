"""A seeded small_cnn checkpoint whose BatchNorm statistics come from noisy CIFAR-10 test images.

Random weights with default BN statistics predict one class for every input (all counts in one class);
calibrated BN makes the logits depend on the image, so counts split between classes and some images
certify (at various radii) while others abstain, which tests of certification need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adre_ray.data import load_images
from adre_ray.models import build_model, save_model_checkpoint


def calibrated_small_cnn(path: Path, data_dir: Path, sigma: float, *, seed: int, first_image: int,
                         extra: dict[str, Any]) -> Path:
    """Save the model to ``path``: BN statistics over test images first_image, first_image + 40, ..."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, "cifar10")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    images, _ = load_images("cifar10", data_dir, "test", list(range(first_image, 10_000, 40)))
    model.train()
    with torch.no_grad():
        model(images + sigma * torch.randn_like(images))
    return save_model_checkpoint(path, model.eval(), model_name="small_cnn", num_classes=10,
                                 dataset="cifar10", extra=extra)
