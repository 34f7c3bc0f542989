"""The objective protocol the training loop and evaluation call, and the factory from a recipe."""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.nn import functional as F

from ..metrics import logits_of


class Objective(Protocol):
    """Both losses take RAW model outputs (a tensor, or an HF ``ModelOutput``); ``distill`` has
    ``.alpha`` and ``.temperature``. ``meter()`` accumulates the task's metrics over batches
    (``update(out, y)``, ``result()``) and, for evaluation split over processes, hands out its
    sufficient statistics (``statistics()``) and becomes the sum of several (``merge(list)``)."""

    name: str
    primary: str

    def loss(self, output: Any, targets: torch.Tensor) -> torch.Tensor: ...

    def distill_loss(self, student: Any, teacher: Any, targets: torch.Tensor, distill) -> torch.Tensor: ...

    def meter(self): ...


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the class axis (dim 1) and
    averaged over every other position (samples, and pixels for dense outputs)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="none", log_target=True)
    return kl.sum(1).mean() * (t * t)


__all__ = ["Objective", "logits_of", "soft_kl"]
