"""Small networks built around the blocks that break naive channel pruners: a bottleneck ResNet,
ResNeXt grouped convs, DenseNet concatenation, squeeze-and-excitation gating, ConvNeXt blocks
(depthwise 7x7, channels-last LayerNorm, MLP, layer scale), plus Hugging Face ViT and Segformer
built from small configs (random init, nothing downloaded). Sizes default to test scale."""
from __future__ import annotations

import torch
from torch import nn

from .registry import MODELS
from .resnet import BasicBlock, bottleneck_stages


class BottleneckResNet(nn.Module):
    """Stem + one bottleneck stage per entry of ``planes`` (ResNeXt with ``groups > 1``)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, stem: int = 32, planes=(16, 32),
                 blocks: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layers, cin = bottleneck_stages(stem, [blocks] * len(planes), planes, groups, base_width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet_bottleneck_small")
def resnet_bottleneck_small(num_classes: int = 10, in_channels: int = 3, stem: int = 32, planes=(16, 32),
                            blocks: int = 1) -> nn.Module:
    return BottleneckResNet(num_classes, in_channels, stem, tuple(planes), blocks)


@MODELS.register("resnext_small")
def resnext_small(num_classes: int = 10, in_channels: int = 3, stem: int = 32, planes=(16, 32), blocks: int = 1,
                  groups: int = 4, base_width: int = 32) -> nn.Module:
    """Grouped 3x3 convs: width = planes * base_width / 64 * groups (32 channels in 4 groups by default)."""
    return BottleneckResNet(num_classes, in_channels, stem, tuple(planes), blocks, groups, base_width)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], dim=1)  # the concat DepGraph must split


class DenseNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, stem: int = 32, growth: int = 16, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        blocks, c = [], stem
        for _ in range(layers):
            blocks.append(DenseLayer(c, growth))
            c += growth
        self.block = nn.Sequential(*blocks)
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.bn = nn.BatchNorm2d(c // 2)
        self.fc = nn.Linear(c // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(self.block(self.stem(x)))
        x = torch.relu(self.bn(x)).mean(dim=(2, 3))
        return self.fc(x)


@MODELS.register("densenet_small")
def densenet_small(num_classes: int = 10, in_channels: int = 3, stem: int = 32, growth: int = 16,
                   layers: int = 3) -> nn.Module:
    return DenseNetSmall(num_classes, in_channels, stem, growth, layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * s[:, :, None, None]  # channel gating: the gate's width is coupled with x's


class SEBlock(BasicBlock):
    """A basic residual block whose residual branch is gated by squeeze-and-excitation."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, stride)
        self.se = SqueezeExcite(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(out + self.shortcut(x))


class SENetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=(32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(SEBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


@MODELS.register("senet_small")
def senet_small(num_classes: int = 10, in_channels: int = 3, widths=(32, 64)) -> nn.Module:
    return SENetSmall(num_classes, in_channels, tuple(widths))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (ConvNeXt's stem/downsampling norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 0.1):  # paper: 1e-6 (trained); 0.1 keeps random-init blocks visible
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)            # channels-last
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))  # layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dims=(32, 64), depth: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, 2), LayerNorm2d(dims[0]))
        stages: list[nn.Module] = []
        for i, d in enumerate(dims):
            if i > 0:
                stages += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages += [ConvNeXtBlock(d) for _ in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stages(self.stem(x)).mean(dim=(2, 3))))


@MODELS.register("convnext_small_blocks")
def convnext_small_blocks(num_classes: int = 10, in_channels: int = 3, dims=(32, 64), depth: int = 1) -> nn.Module:
    return ConvNeXtSmall(num_classes, in_channels, tuple(dims), depth)


@MODELS.register("hf_vit")
def hf_vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 16, patch_size: int = 4,
           hidden_size: int = 64, depth: int = 2, heads: int = 4, intermediate_size: int = 128) -> nn.Module:
    """transformers' ViTForImageClassification from a config (random init, eager attention)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=in_channels, hidden_size=hidden_size,
                    num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=intermediate_size,
                    num_labels=num_classes, attn_implementation="eager")
    return ViTForImageClassification(cfg)


@MODELS.register("hf_segformer")
def hf_segformer(num_classes: int = 4, in_channels: int = 3, hidden_sizes=(32, 64), heads=(2, 4), depths=(1, 1),
                 sr_ratios=(2, 1), decoder_hidden_size: int = 64) -> nn.Module:
    """transformers' SegformerForSemanticSegmentation from a config; logits are [B, C, H/4, W/4]."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    n = len(hidden_sizes)
    cfg = SegformerConfig(num_channels=in_channels, num_encoder_blocks=n, depths=list(depths),
                          sr_ratios=list(sr_ratios), hidden_sizes=list(hidden_sizes), num_attention_heads=list(heads),
                          patch_sizes=[7] + [3] * (n - 1), strides=[4] + [2] * (n - 1), mlp_ratios=[2] * n,
                          decoder_hidden_size=decoder_hidden_size, num_labels=num_classes, attn_implementation="eager")
    return SegformerForSemanticSegmentation(cfg)
