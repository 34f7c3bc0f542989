"""Small convolutional and fully connected models (quickstart, lottery-ticket paper's nets)."""
from __future__ import annotations

import torch
from torch import nn

from .registry import MODELS


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Quickstart net: a stem, a widening conv, and a residual block (so pruning must couple the
    two convs that feed the addition), global pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.stem = _conv_bn(in_channels, w)
        self.conv1 = _conv_bn(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.res_a = _conv_bn(2 * w, 2 * w)
        self.res_b = nn.Sequential(
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        )
        self.conv2 = _conv_bn(2 * w, 4 * w)
        self.head = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(self.stem(x)))
        x = torch.relu(x + self.res_b(self.res_a(x)))
        x = self.conv2(x)
        return self.fc(torch.flatten(self.head(x), 1))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)


class LeNet300100(nn.Module):
    """LeNet-300-100 (Frankle & Carbin 2019): 784-300-100-10 fully connected with ReLU."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden=(300, 100)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for i, h in enumerate(hidden):
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("lenet_300_100")
def lenet_300_100(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet300100(num_classes, in_channels * image_size * image_size)


class ConvN(nn.Module):
    """Conv-2/4/6 from the lottery-ticket paper (VGG-like: pairs of 3x3 convs, max-pool after each
    pair, then FC 256-256-classes). Inputs are CIFAR-sized by default."""

    def __init__(self, plan: list, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        size = image_size
        for spec in plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(c, spec, 3, padding=1), nn.ReLU(inplace=True)]
                c = spec
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * size * size, 256), nn.ReLU(inplace=True),
            nn.Linear(256, 256), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.classifier(self.features(x)))


@MODELS.register("conv2")
def conv2(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ConvN([64, 64, "M"], num_classes, in_channels, image_size)


@MODELS.register("conv4")
def conv4(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ConvN([64, 64, "M", 128, 128, "M"], num_classes, in_channels, image_size)


@MODELS.register("conv6")
def conv6(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ConvN([64, 64, "M", 128, 128, "M", 256, 256, "M"], num_classes, in_channels, image_size)
