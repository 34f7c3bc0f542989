"""The built-in model zoo.

Every factory is registered under a bare name so recipes can say ``factory: resnet20`` instead of
``factory: compress.zoo:resnet20``. Factories take ``num_classes`` and, where meaningful,
``in_channels``; everything else has a sensible default for small inputs.
"""
from __future__ import annotations

from ..registry import Registry

MODELS: Registry = Registry("model")

from . import blocks, cnn, mobilenet, resnet, vgg, vit  # noqa: E402,F401  (registration side effects)
from .cnn import conv2, conv4, conv6, lenet_300_100, small_cnn  # noqa: E402,F401
from .mobilenet import mobilenet_v2  # noqa: E402,F401
from .resnet import resnet20, resnet32, resnet56  # noqa: E402,F401
from .vgg import vgg11, vgg16, vgg19  # noqa: E402,F401
from .vit import vit_tiny  # noqa: E402,F401
from .blocks import (convnext_small_blocks, densenet_small, hf_segformer, hf_vit,  # noqa: E402,F401
                     resnet_bottleneck_small, resnext_small, senet_small)
