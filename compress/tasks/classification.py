"""Classification: cross-entropy, Hinton distillation, top-1 / top-5 accuracy."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..metrics import ClassificationMeter, logits_of
from .base import soft_kl


class Classification:
    name = "classification"
    primary = "accuracy"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_of(output), targets, label_smoothing=self.label_smoothing)

    def distill_loss(self, student, teacher, targets: torch.Tensor, distill) -> torch.Tensor:
        """Hinton et al. 2015: alpha * T^2 * KL + (1 - alpha) * CE."""
        s, t = logits_of(student), logits_of(teacher)
        return distill.alpha * soft_kl(s, t, distill.temperature) + (1 - distill.alpha) * self.loss(s, targets)

    def meter(self) -> ClassificationMeter:
        return ClassificationMeter()
