"""Semantic segmentation: per-pixel cross-entropy with ``ignore_index``, distillation on per-pixel
logits, mean IoU. Models that predict at a lower resolution (Segformer: 1/4) have their logits
resized (bilinear) to the label map's size before any loss or metric."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..metrics import logits_of
from .base import soft_kl


def dense_logits(output, size) -> torch.Tensor:
    """``[N, C, h, w]`` logits at the label size ``(H, W)``."""
    x = logits_of(output)
    if x.dim() != 4:
        raise ValueError(f"segmentation needs logits [batch, classes, height, width], got shape {list(x.shape)}")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


class SegmentationMeter:
    """Per-class intersection / union from a confusion matrix; ``miou`` averages the classes that
    occur (in labels or predictions), in percent; ``pixel_accuracy`` over scored pixels."""

    primary = "miou"

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index
        self.confusion: torch.Tensor | None = None
        self.loss_sum, self.pixels = 0.0, 0

    def update(self, output, targets: torch.Tensor) -> None:
        logits = dense_logits(output, targets.shape[-2:])
        c = logits.shape[1]
        self.loss_sum += F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum").item()
        pred = logits.argmax(1)
        keep = targets != self.ignore_index
        y, p = targets[keep].long(), pred[keep].long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            raise ValueError(f"label {int(y.max())} outside the model's {c} classes")
        cm = torch.bincount(y * c + p, minlength=c * c).reshape(c, c).cpu()
        self.confusion = cm if self.confusion is None else self.confusion + cm
        self.pixels += int(keep.sum())

    def statistics(self) -> dict:
        """The confusion matrix (None before any item), the summed loss and the scored pixels."""
        return {"confusion": self.confusion, "loss_sum": self.loss_sum, "pixels": self.pixels}

    def merge(self, shards: list[dict]) -> None:
        """Become the meter of all ``shards``' pixels (each a :meth:`statistics`, in rank order)."""
        matrices = [s["confusion"] for s in shards if s["confusion"] is not None]
        self.confusion = torch.stack(matrices).sum(0) if matrices else None
        self.loss_sum = math.fsum(s["loss_sum"] for s in shards)
        self.pixels = sum(s["pixels"] for s in shards)

    def result(self) -> dict[str, float]:
        if self.confusion is None or self.pixels == 0:
            return {"miou": 0.0, "pixel_accuracy": 0.0, "loss": 0.0}
        cm = self.confusion.double()
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        present = union > 0
        iou = inter[present] / union[present]
        return {"miou": 100.0 * float(iou.mean()), "pixel_accuracy": 100.0 * float(inter.sum() / cm.sum()),
                "loss": self.loss_sum / self.pixels}


class Segmentation:
    name = "segmentation"
    primary = "miou"

    def __init__(self, ignore_index: int = 255):
        self.ignore_index = ignore_index

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(dense_logits(output, targets.shape[-2:]), targets, ignore_index=self.ignore_index)

    def distill_loss(self, student, teacher, targets: torch.Tensor, distill) -> torch.Tensor:
        """alpha * T^2 * per-pixel KL (at the label size, ignored pixels left out) + (1 - alpha) * CE."""
        size = targets.shape[-2:]
        s, t = dense_logits(student, size), dense_logits(teacher, size)
        keep = (targets != self.ignore_index).unsqueeze(1)
        tt = distill.temperature
        kl = F.kl_div(F.log_softmax(s / tt, 1), F.log_softmax(t / tt, 1), reduction="none", log_target=True).sum(1,
                                                                                                             keepdim=True)
        kd = (kl * keep).sum() / keep.sum().clamp_min(1) * (tt * tt)
        ce = F.cross_entropy(s, targets, ignore_index=self.ignore_index)
        return distill.alpha * kd + (1 - distill.alpha) * ce

    def meter(self) -> SegmentationMeter:
        return SegmentationMeter(self.ignore_index)


__all__ = ["Segmentation", "SegmentationMeter", "dense_logits", "soft_kl"]
