"""The CIFAR ResNet of the randomized-smoothing papers (Cohen et al. 2019, Salman et al. 2019).

He et al. (2016), section 4.2: a 3x3 conv with 16 filters, three stages of n basic blocks with 16, 32
and 64 channels (the 2nd and 3rd stage start with stride 2), global average pooling and a linear layer:
depth 6n + 2. Shortcuts that change shape are 1x1 conv + BN (as in the papers' ``archs/cifar_resnet.py``).
ResNet-110 has ~1.73M parameters. Global pooling is adaptive, so any input size works.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adre_ray.models.registry import register_model


class BasicBlock(nn.Module):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    """ResNet of depth 6n + 2 for small images (expects normalized inputs; see ``build_model``)."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth!r}: must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...)")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # N(0, 2 / (k * k * out_channels)), as the papers' code
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("cifar_resnet20")
def cifar_resnet20(num_classes: int, dataset: str) -> nn.Module:
    """ResNet-20 (n = 3), ~0.27M parameters."""
    return CifarResNet(20, num_classes)


@register_model("cifar_resnet110")
def cifar_resnet110(num_classes: int, dataset: str) -> nn.Module:
    """ResNet-110 (n = 18), ~1.73M parameters: the CIFAR-10 base classifier of Cohen / Salman / ADRE."""
    return CifarResNet(110, num_classes)
