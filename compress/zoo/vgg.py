"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015; one FC classifier as in most
CIFAR pruning papers)."""
from __future__ import annotations

import torch
from torch import nn

from .registry import MODELS

_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for spec in _PLANS[depth]:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(8, int(spec * width_mult))
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("vgg11")
def vgg11(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return VGG(11, num_classes, in_channels, width_mult)


@MODELS.register("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return VGG(16, num_classes, in_channels, width_mult)


@MODELS.register("vgg19")
def vgg19(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return VGG(19, num_classes, in_channels, width_mult)
