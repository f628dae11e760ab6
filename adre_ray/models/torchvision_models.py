"""ImageNet architectures from torchvision, always randomly initialized (``weights=None``: no download)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet50 as tv_resnet50

from adre_ray.models.registry import register_model


@register_model("resnet50")
def resnet50(num_classes: int, dataset: str) -> nn.Module:
    """torchvision ResNet-50 (25.6M parameters at 1000 classes), the papers' ImageNet base classifier."""
    return tv_resnet50(weights=None, num_classes=num_classes)
