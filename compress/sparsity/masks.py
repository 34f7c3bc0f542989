"""The one mask system: every kind of weight sparsity (2:4, unstructured magnitude/lottery masks,
pruning-at-init) is a ``<param>_mask`` buffer on the module that owns the parameter.

Buffers travel in ``state_dict`` (so portable checkpoints keep them) and the training loop calls
:func:`mask_gradients` before and :func:`apply_masks` after each optimizer step, and
:func:`mask_optimizer_state` when an optimizer is created, so masked weights stay exactly zero.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ..modules import tensor_owner

SUFFIX = "_mask"


def set_mask(module: nn.Module, mask: torch.Tensor, param: str = "weight") -> None:
    """Attach (or replace) the mask of ``module.<param>`` and zero the masked weights now."""
    weight = getattr(module, param)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {param} shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=weight.dtype)
    name = param + SUFFIX
    if name in module._buffers:
        module._buffers[name] = mask
    else:
        module.register_buffer(name, mask)
    with torch.no_grad():
        weight.mul_(mask)


def remove_mask(module: nn.Module, param: str = "weight") -> None:
    module._buffers.pop(param + SUFFIX, None)


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Yield ``(module_name, module, param_name, mask)`` for every masked parameter."""
    for mname, mod in model.named_modules():
        for bname, buf in mod._buffers.items():
            if buf is not None and bname.endswith(SUFFIX):
                pname = bname[: -len(SUFFIX)]
                if isinstance(getattr(mod, pname, None), torch.Tensor):
                    yield mname, mod, pname, buf


def has_masks(model: nn.Module) -> bool:
    return next(iter_masks(model), None) is not None


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for _, mod, pname, mask in iter_masks(model):
        getattr(mod, pname).mul_(mask)


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    for _, mod, pname, mask in iter_masks(model):
        g = getattr(mod, pname).grad
        if g is not None:
            g.mul_(mask)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Zero every per-parameter state tensor (momentum, Adam moments) at masked positions."""
    for _, mod, pname, mask in iter_masks(model):
        state = optimizer.state.get(getattr(mod, pname))
        if not state:
            continue
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.shape == mask.shape:
                v.mul_(mask)


def density(model: nn.Module) -> dict[str, float]:
    """Fraction of weights kept per masked parameter."""
    return {f"{m}.{p}": float(mask.mean()) for m, _, p, mask in iter_masks(model)}


# ---------------------------------------------------------------------------------------------
# Masks as data: ``{"<module>.<param>": 0/1 tensor}``, for methods that decide which weights to keep
# (lottery tickets, pruning at init, dynamic sparse training) before setting them on a model.

Masks = dict[str, torch.Tensor]  # "<module>.<param>" -> 0/1 tensor of the parameter's shape


def current_masks(model: nn.Module, names: list[str]) -> Masks:
    """The masks ``model`` carries for ``names`` (all-ones where it carries none)."""
    out = {}
    for name in names:
        mod, pname = tensor_owner(model, name)
        m = mod._buffers.get(pname + SUFFIX)
        out[name] = (m.detach().clone().cpu() if m is not None
                     else torch.ones_like(getattr(mod, pname), device="cpu"))
    return out


def set_masks(model: nn.Module, masks: Masks) -> None:
    for name, m in masks.items():
        mod, pname = tensor_owner(model, name)
        set_mask(mod, m, pname)


def percent_remaining(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return 100.0 * sum(float(m.sum()) for m in masks.values()) / max(1, total)


def keep_largest(scores: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` highest scores among currently unmasked entries (ties: lower index wins)."""
    flat = torch.where(mask.flatten() > 0, scores.flatten().double(), torch.tensor(-math.inf, dtype=torch.double))
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    out = torch.zeros(flat.numel(), dtype=mask.dtype)
    out[order] = 1.0
    return out.view_as(mask)


def keep_largest_global(scores: dict[str, torch.Tensor], masks: Masks, keep: int) -> Masks:
    """One ranking over all tensors: keep the ``keep`` highest scores among unmasked weights."""
    names = list(masks)
    big = torch.cat([scores[n].flatten().cpu() for n in names])
    kept = keep_largest(big, torch.cat([masks[n].flatten() for n in names]), keep)
    out, i = {}, 0
    for n in names:
        k = masks[n].numel()
        out[n] = kept[i: i + k].view_as(masks[n]).clone()
        i += k
    return out


def random_masks_like(masks: Masks, seed: int) -> Masks:
    """Random masks with exactly the per-tensor density of ``masks`` (the random-pruning control)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        keep = int(m.sum())
        idx = torch.randperm(m.numel(), generator=g)[:keep]
        r = torch.zeros(m.numel(), dtype=m.dtype)
        r[idx] = 1.0
        out[n] = r.view_as(m)
    return out


# ---------------------------------------------------------------------------------------------
# Data order and rewinding
