"""Accuracy, loss, parameter and MAC counts."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from . import distributed as dist
from .example_inputs import example_input


def map_tensors(fn, inputs):
    """``fn`` applied to every tensor of a batch's inputs (a tensor, a tuple/list/namedtuple or a dict
    of tensors), the structure kept; anything else is returned as it is. The one walk over input
    structures that moving, casting, slicing and repeating batches share."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: map_tensors(fn, v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        parts = [map_tensors(fn, v) for v in inputs]
        return type(inputs)(parts) if type(inputs) in (list, tuple) else type(inputs)(*parts)  # a namedtuple
    return inputs


def to_device(inputs, device, channels_last: bool = False, float_dtype: torch.dtype | None = None):
    """A batch's inputs (a tensor, a tuple/list/namedtuple or a dict of tensors) on ``device``;
    4-D float tensors NHWC when ``channels_last``; float tensors cast to ``float_dtype`` when given
    (token ids and masks keep their integer type)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        if float_dtype is not None and t.is_floating_point():
            t = t.to(float_dtype)
        if channels_last and t.dim() == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return map_tensors(move, inputs)


def call_model(model: nn.Module, inputs):
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def slice_batch(inputs, start: int, stop: int):
    """Items ``start:stop`` of a batch's inputs (a tensor, a tuple/list/namedtuple or a dict of
    tensors, sliced along the batch dimension)."""
    return map_tensors(lambda t: t[start:stop], inputs)


def repeat_batch(inputs, batch_size: int):
    """A batch of ``batch_size`` made of a one-item batch's inputs (tensor, tuple or dict), repeated."""
    return map_tensors(lambda t: t[:1].repeat(batch_size, *([1] * (t.dim() - 1))), inputs)


def batch_inputs(batch):
    """The inputs of a calibration batch given either as ``(inputs, targets)`` or as bare inputs (a
    tensor or a dict of tensors; a model with several positional inputs comes as ``(inputs, targets)``,
    since a bare tuple would read as that pair)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def batch_size_of(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs[0]
    return batch_size_of(first)


class ClassificationMeter:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy over batches."""

    primary = "accuracy"

    def __init__(self):
        self.correct = self.correct5 = self.n = 0
        self.loss_sum = 0.0

    def update(self, output, targets: torch.Tensor) -> None:
        out = logits_of(output)
        self.loss_sum += F.cross_entropy(out, targets, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        self.correct += (top[:, 0] == targets).sum().item()
        self.correct5 += (top == targets[:, None]).any(1).sum().item()
        self.n += len(targets)

    def statistics(self) -> dict:
        """The sums the metrics are made of (counts exact; summed over evaluation shards)."""
        return {"correct": self.correct, "correct5": self.correct5, "n": self.n, "loss_sum": self.loss_sum}

    def merge(self, shards: list[dict]) -> None:
        """Become the meter of all ``shards``' items (each a :meth:`statistics`, in rank order)."""
        self.correct, self.correct5, self.n = (sum(s[k] for s in shards) for k in ("correct", "correct5", "n"))
        self.loss_sum = math.fsum(s["loss_sum"] for s in shards)

    def result(self) -> dict[str, float]:
        n = max(1, self.n)
        return {"accuracy": 100.0 * self.correct / n, "top5": 100.0 * self.correct5 / n, "loss": self.loss_sum / n}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", objective=None) -> dict[str, float]:
    """The task's metrics over every batch of ``loader`` (``(inputs, targets)`` batches); without an
    ``objective``, classification: top-1 ``accuracy`` and ``top5`` (percent) and mean cross-entropy.

    Under torchrun, inside a collective block (every rank evaluating the same model), each rank
    reads only its shard of the split (:func:`compress.distributed.evaluation_shard`: every item
    once, no padding) and the meters' sufficient statistics (counts, confusion matrices, sums) are
    gathered and summed in rank order, so every rank gets the metric one process gets over the
    whole split (counts exactly; summed losses up to float rounding)."""
    was_training = model.training
    model.eval()
    meter = objective.meter() if objective is not None else ClassificationMeter()
    shard = dist.evaluation_shard(loader)
    for inputs, targets in (shard if shard is not None else loader):
        out = call_model(model, to_device(inputs, device))
        meter.update(out, targets.to(device))
    if shard is not None:
        meter.merge(dist.all_gather_object(meter.statistics()))
    model.train(was_training)
    return meter.result()


def logits_of(out) -> torch.Tensor:
    """Models from HF return an output object; ours return a tensor. Accepted: a tensor, an object
    with ``.logits``, a mapping with a ``"logits"`` key, or a tuple/list whose first item is one."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        keys = ", ".join(repr(k) for k in list(out)[:8])
        raise TypeError(f"cannot find logits in model output: a {type(out).__name__} without a 'logits' key "
                        f"(keys: {keys})")
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape, device: torch.device | str = "cpu", example=None) -> int:
    """Multiply-accumulates for one sample (Torch-Pruning's op counter). ``example`` (one real
    sample's inputs, batch 1: a tensor, tuple or dict) replaces a random input of ``input_shape``."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    example = example_input(model, input_shape, 1, device=device) if example is None else to_device(example, device)
    macs, _ = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs)


def model_stats(model: nn.Module, input_shape, device="cpu", example=None) -> dict[str, int]:
    return {
        "params": count_params(model),
        "nonzero_params": count_nonzero_params(model),
        "macs": count_macs(model, input_shape, device, example),
    }
