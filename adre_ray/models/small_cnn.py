"""A small, fast CNN for CPU runs (tests, demo): three conv + BN + ReLU layers, global pooling, linear."""

from __future__ import annotations

from torch import nn

from adre_ray.models.registry import register_model


class SmallCNN(nn.Sequential):
    """conv3x3(3->w) / conv3x3(w->2w, stride 2) / conv3x3(2w->4w, stride 2), each + BN + ReLU; global
    average pooling (any input size); linear to the classes. ~10M multiply-adds per 32x32 image at w=32."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        layers: list[nn.Module] = []
        channels = (3, width, 2 * width, 4 * width)
        for i, stride in enumerate((1, 2, 2)):
            layers += [nn.Conv2d(channels[i], channels[i + 1], 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(channels[i + 1]), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes))


@register_model("small_cnn")
def small_cnn(num_classes: int, dataset: str) -> nn.Module:
    return SmallCNN(num_classes)
