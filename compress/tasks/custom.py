"""A task defined by the recipe: ``loss``, ``metric`` and optionally ``distill_loss`` as
``module:callable`` (the recipe names them, so importing them is the user's say-so)."""
from __future__ import annotations

import math

import torch

from ..metrics import batch_size_of, logits_of
from ..registry import import_callable
from .base import soft_kl


class CustomMeter:
    primary = "metric"

    def __init__(self, task: "Custom"):
        self.task = task
        self.metric_sum = self.loss_sum = 0.0
        self.n = 0

    def update(self, output, targets: torch.Tensor) -> None:
        n = batch_size_of(targets)
        self.metric_sum += float(self.task.metric_fn(output, targets)) * n
        self.loss_sum += float(self.task.loss(output, targets)) * n
        self.n += n

    def statistics(self) -> dict:
        """Sample-weighted sums of the batch metric and loss, and the sample count. Summed over
        evaluation shards, the result equals one process's when ``metric`` is a mean over the
        batch's samples (accuracy-like); a metric that is not one (e.g. a per-batch F1) depends on
        how the items are batched, and so on the number of processes."""
        return {"metric_sum": self.metric_sum, "loss_sum": self.loss_sum, "n": self.n}

    def merge(self, shards: list[dict]) -> None:
        self.metric_sum = math.fsum(s["metric_sum"] for s in shards)
        self.loss_sum = math.fsum(s["loss_sum"] for s in shards)
        self.n = sum(s["n"] for s in shards)

    def result(self) -> dict[str, float]:
        n = max(1, self.n)
        return {"metric": self.metric_sum / n, "loss": self.loss_sum / n}


class Custom:
    name = "custom"
    primary = "metric"

    def __init__(self, cfg):
        self.loss_fn = import_callable(cfg.loss, field="task.loss")
        self.metric_fn = import_callable(cfg.metric, field="task.metric")
        self.distill_fn = import_callable(cfg.distill_loss, field="task.distill_loss") if cfg.distill_loss else None

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, targets)

    def distill_loss(self, student, teacher, targets: torch.Tensor, distill) -> torch.Tensor:
        if self.distill_fn is not None:
            return self.distill_fn(student, teacher, targets, distill)
        kd = soft_kl(logits_of(student), logits_of(teacher), distill.temperature)
        return distill.alpha * kd + (1 - distill.alpha) * self.loss(student, targets)

    def meter(self) -> CustomMeter:
        return CustomMeter(self)
