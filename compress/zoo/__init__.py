"""The built-in model zoo.

Every factory is registered under a bare name so recipes can say ``factory: resnet20`` instead of
``factory: compress.zoo:resnet20``. Factories take ``num_classes`` and, where meaningful,
``in_channels``; everything else has a sensible default for small inputs. Importing this package
registers every model (each module registers its own factories in :data:`MODELS`).
"""
from __future__ import annotations

from .blocks import (convnext_small_blocks, densenet_small, hf_segformer, hf_vit, resnet_bottleneck_small,
                     resnext_small, senet_small)
from .hf import hf_pretrained
from .cnn import conv2, conv4, conv6, lenet_300_100, small_cnn
from .mobilenet import mobilenet_v2
from .registry import MODELS
from .resnet import resnet20, resnet32, resnet56
from .vgg import vgg11, vgg16, vgg19
from .vit import vit_tiny

__all__ = ["MODELS", "conv2", "conv4", "conv6", "convnext_small_blocks", "densenet_small", "hf_pretrained", "hf_segformer", "hf_vit",
           "lenet_300_100", "mobilenet_v2", "resnet20", "resnet32", "resnet56", "resnet_bottleneck_small",
           "resnext_small", "senet_small", "small_cnn", "vgg11", "vgg16", "vgg19", "vit_tiny"]
