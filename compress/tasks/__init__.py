"""Tasks: what a model's outputs mean. Each task is an objective the training loop and evaluation
use (``loss``, ``distill_loss``, ``meter``) plus its primary metric, which the gates judge:

- ``classification``: cross-entropy, Hinton distillation, top-1 and top-5 accuracy;
- ``segmentation``: per-pixel cross-entropy with ``ignore_index``, distillation on per-pixel logits,
  mean IoU; ``[N, C, h, w]`` outputs are resized (bilinear) to the label size first;
- ``custom``: the recipe's own ``loss``, ``metric`` and ``distill_loss`` (``module:callable``).
"""
from __future__ import annotations

from .base import Objective
from .classification import Classification
from .config import TaskConfig
from .custom import Custom
from .factory import build_objective
from .segmentation import Segmentation, SegmentationMeter

__all__ = ["Classification", "Custom", "Objective", "Segmentation", "SegmentationMeter", "TaskConfig",
           "build_objective"]
