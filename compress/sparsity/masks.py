"""The one mask system: every kind of weight sparsity (2:4, unstructured magnitude/lottery masks,
pruning-at-init) is a ``<param>_mask`` buffer on the module that owns the parameter.

Buffers travel in ``state_dict`` (so portable checkpoints keep them) and the training loop calls
:func:`mask_gradients` before and :func:`apply_masks` after each optimizer step, and
:func:`mask_optimizer_state` when an optimizer is created, so masked weights stay exactly zero.

Masks also hold in a training loop compress does not own (``loss.backward(); opt.step()`` in the
user's code): every masked module carries a forward pre-hook (:func:`enforce_masks`, installed by
:func:`set_mask` and by :func:`install_mask_hooks` after loading) which re-zeroes the masked weights
and makes sure the parameter has a gradient hook multiplying its gradient by the mask. With a
zero gradient and a zero weight, SGD (momentum, weight decay), Adam and AdamW (decoupled weight
decay) all leave a masked weight at exactly zero, and the pre-hook catches any optimizer that would
not. Why hooks and not ``torch.nn.utils.parametrize``: a parametrization renames the weight in
``state_dict`` (``parametrizations.weight.original``) and swaps the module's class, which would break
every run directory already written, Torch-Pruning's graph tracing and the ONNX exporters; the
hooks leave the module, its class and its ``state_dict`` keys as they were. Cost per training step:
one multiply per masked weight in forward and one per gradient in backward, none under
``torch.no_grad()`` (``benchmarks/mask_overhead.py``). :func:`strip` bakes the masks into plain weights and removes both.
"""
from __future__ import annotations

import math
import weakref
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
    _add_pre_hook(module)


def remove_mask(module: nn.Module, param: str = "weight") -> None:
    """Drop the mask of ``module.<param>`` (the weights keep their values, zeros included)."""
    module._buffers.pop(param + SUFFIX, None)
    _drop_grad_hook(getattr(module, param, None))
    if not _module_masks(module):
        _remove_pre_hook(module)


# ---------------------------------------------------------------------------------------------
# Enforcement in any training loop (see the module docstring).

_GRAD_HOOK = "_compress_mask_grad_hook"  # attribute on a Parameter: the handle of its gradient hook


def _module_masks(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(b[: -len(SUFFIX)], buf) for b, buf in module._buffers.items()
            if buf is not None and b.endswith(SUFFIX) and isinstance(getattr(module, b[: -len(SUFFIX)], None),
                                                                      torch.Tensor)]


def _masked_gradient(module_ref: "weakref.ref[nn.Module]", pname: str):
    # reads the module's mask when the gradient arrives, so a replaced mask (dynamic sparse
    # training) or a module moved to another device is honoured; holds no strong reference
    def hook(grad: torch.Tensor) -> torch.Tensor:
        module = module_ref()
        mask = None if module is None else module._buffers.get(pname + SUFFIX)
        if mask is None or mask.shape != grad.shape:
            return grad
        return grad * mask.to(dtype=grad.dtype, device=grad.device)

    return hook


def _drop_grad_hook(param) -> None:
    handle = getattr(param, _GRAD_HOOK, None) if isinstance(param, nn.Parameter) else None
    if handle is not None:
        handle.remove()
        delattr(param, _GRAD_HOOK)


def _exporting() -> bool:
    """Tracing for export or compiling: the weights are already zero, and an in-place write in
    forward would be recorded into the graph."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    onnx = getattr(torch, "onnx", None)
    if onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def enforce_masks(module: nn.Module, args=None) -> None:
    """The forward pre-hook of a masked module: zero its masked weights and give each masked
    parameter (a new one too, after ``load_state_dict``, ``deepcopy`` or pruning) its gradient hook.
    Nothing to do without autograd (inference): no gradient can move a weight there."""
    if not torch.is_grad_enabled() or _exporting():
        return
    for pname, mask in _module_masks(module):
        param = getattr(module, pname)
        if mask.shape != param.shape:
            continue
        with torch.no_grad():
            param.data.mul_(mask.to(dtype=param.dtype, device=param.device))
        if isinstance(param, nn.Parameter) and param.requires_grad and getattr(param, _GRAD_HOOK, None) is None:
            setattr(param, _GRAD_HOOK, param.register_hook(_masked_gradient(weakref.ref(module), pname)))


def _has_pre_hook(module: nn.Module) -> bool:
    return any(h is enforce_masks for h in module._forward_pre_hooks.values())


def _add_pre_hook(module: nn.Module) -> None:
    if not _has_pre_hook(module):
        module.register_forward_pre_hook(enforce_masks)
    enforce_masks(module)


def _remove_pre_hook(module: nn.Module) -> None:
    for key, h in list(module._forward_pre_hooks.items()):
        if h is enforce_masks:
            del module._forward_pre_hooks[key]
            getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)


def install_mask_hooks(model: nn.Module) -> nn.Module:
    """Give every module that carries a mask its enforcement hooks (after a model was loaded from
    a ``state_dict`` whose ``*_mask`` buffers were registered directly). Idempotent."""
    for _, mod, _, _ in list(iter_masks(model)):
        _add_pre_hook(mod)
    return model


@torch.no_grad()
def strip(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (masked entries exactly zero) and remove the mask buffers
    and hooks, in place: a plain model whose ``state_dict`` holds weights only. Returns ``model``."""
    for _, mod, pname, mask in list(iter_masks(model)):
        getattr(mod, pname).mul_(mask.to(getattr(mod, pname).dtype))
        remove_mask(mod, pname)
    for mod in model.modules():  # a hook left behind by a mask removed some other way
        _remove_pre_hook(mod)
    return model


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
