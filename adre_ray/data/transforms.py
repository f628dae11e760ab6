"""Image transforms. Every pipeline ends as a float32 tensor of [0, 1] pixels, C x H x W, un-normalized:
the model's ``NormalizeLayer`` normalizes, so noise, PGD balls and certified radii live in pixel space.

- CIFAR-10 train: RandomCrop(32, padding=4) + RandomHorizontalFlip; eval: none.
- ImageNet train: RandomResizedCrop(224) + RandomHorizontalFlip; eval: Resize(256) + CenterCrop(224).

The pipelines accept a PIL image or a uint8 C x H x W tensor (as decoded from JPEG bytes).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from adre_ray.data.info import dataset_info

IMAGENET_RESIZE = 256
"""Eval-time shorter-side resize before the centre crop to ``image_size`` (224 / 256 = 0.875)."""


def image_transform(dataset: str, *, augment: bool) -> v2.Compose:
    """The transform of ``dataset`` with (``augment=True``) or without training augmentation."""
    info = dataset_info(dataset)
    size = info.image_size
    if dataset == "cifar10":
        geometric = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()] if augment else []
    else:
        geometric = ([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if augment
                     else [v2.Resize(IMAGENET_RESIZE, antialias=True), v2.CenterCrop(size)])
    return v2.Compose([v2.ToImage(), *geometric, v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])
