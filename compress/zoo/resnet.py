"""CIFAR-style ResNets (He et al. 2016, section 4.2): 3 stages of 6n+2 layers."""
from __future__ import annotations

import torch
from torch import nn

from .registry import MODELS


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            # projection shortcut (option B) so the residual stays prunable with DepGraph
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers = []
        cin = width
        for stage, cout in enumerate([width, 2 * width, 4 * width]):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def bottleneck_stages(cin: int, blocks, planes, groups: int = 1, base_width: int = 64) -> tuple[nn.Sequential, int]:
    """Bottleneck stages (stride 2 at the start of every stage but the first); returns (layers, out channels)."""
    layers = []
    for stage, (nb, p) in enumerate(zip(blocks, planes)):
        for i in range(nb):
            layers.append(Bottleneck(cin, p, 2 if (stage > 0 and i == 0) else 1, groups, base_width))
            cin = p * Bottleneck.expansion
    return nn.Sequential(*layers), cin


class ImageNetResNet(nn.Module):
    """ResNet-50-class bottleneck network (optionally ResNeXt via ``groups``) for latency work."""

    def __init__(self, blocks=(3, 4, 6, 3), num_classes: int = 1000, in_channels: int = 3,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layers, cin = bottleneck_stages(64, blocks, (64, 128, 256, 512), groups, base_width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels, width)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels, width)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels, width)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return ImageNetResNet((3, 4, 6, 3), num_classes, in_channels)


@MODELS.register("resnext50_32x4d")
def resnext50_32x4d(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return ImageNetResNet((3, 4, 6, 3), num_classes, in_channels, groups=32, base_width=4)
