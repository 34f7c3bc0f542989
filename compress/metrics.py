"""Accuracy, loss, parameter and MAC counts."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .example_inputs import example_input


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy on ``(x, y)``."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i: i + batch_size].to(device), y[i: i + batch_size].to(device)
        out = logits_of(model(xb))
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train(was_training)
    n = max(1, len(x))
    return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n}


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
def count_macs(model: nn.Module, input_shape, device: torch.device | str = "cpu") -> int:
    """Multiply-accumulates for one sample (Torch-Pruning's op counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    example = example_input(model, input_shape, 1, device=device)
    macs, _ = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs)


def model_stats(model: nn.Module, input_shape, device="cpu") -> dict[str, int]:
    return {
        "params": count_params(model),
        "nonzero_params": count_nonzero_params(model),
        "macs": count_macs(model, input_shape, device),
    }
