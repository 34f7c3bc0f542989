"""The one mask system: every kind of weight sparsity (2:4, unstructured magnitude/lottery masks,
pruning-at-init) is a ``<param>_mask`` buffer on the module that owns the parameter.

Buffers travel in ``state_dict`` (so portable checkpoints keep them) and the training loop calls
:func:`mask_gradients` before and :func:`apply_masks` after each optimizer step, and
:func:`mask_optimizer_state` when an optimizer is created, so masked weights stay exactly zero.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

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
# N:M (2:4) patterns along the reduction dimension, as TensorRT / cuSPARSELt read them.

def reduction_last(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear [out, in] or Conv [K, C, R, S] weight with the reduction (input-channel) dim
    last: Conv becomes [K, R, S, C], so groups of M consecutive input channels are contiguous."""
    if weight.dim() == 2:
        return weight
    if weight.dim() >= 3:
        return weight.movedim(1, -1)
    raise ValueError(f"unsupported weight rank {weight.dim()}")


def from_reduction_last(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if like.dim() == 2 else t.movedim(-1, 1)


def n_m_mask(weight: torch.Tensor, n: int = 2, m: int = 4, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``m - n`` highest-scoring weights in every group of ``m`` consecutive input
    channels (``n`` zeros per group). Scores default to |w|; ties resolve to the lower index."""
    s = (weight.abs() if scores is None else scores).detach()
    r = reduction_last(s)
    c = r.shape[-1]
    if c % m:
        raise ValueError(f"reduction dim {c} is not a multiple of {m}")
    groups = r.reshape(*r.shape[:-1], c // m, m)
    keep = torch.topk(groups, m - n, dim=-1, largest=True, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=weight.dtype)
    mask.scatter_(-1, keep, 1.0)
    return from_reduction_last(mask.reshape(r.shape), weight).contiguous()


def is_n_m_sparse(weight: torch.Tensor, axis: int, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive elements along ``axis`` has >= ``n`` zeros."""
    t = torch.as_tensor(weight).movedim(axis, -1)
    c = t.shape[-1]
    if c % m:
        return False
    zeros = (t.reshape(*t.shape[:-1], c // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())
