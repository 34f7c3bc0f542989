"""Pruning at initialisation: masks from θ0 before any training, one global ranking over the
chosen tensors (the same ``<param>_mask`` buffers as IMP).

- SNIP (Lee et al. 2019): score |g ⊙ θ| on a batch of data; keep the highest.
- GraSP (Wang et al. 2020): score −θ ⊙ (H g) (Hessian-gradient product); remove the highest, i.e.
  keep the weights whose removal hurts gradient flow the most.
- SynFlow (Tanaka et al. 2020): data-free; score |θ ⊙ ∂R/∂θ| with R = 1ᵀ(Π|W|)1 on an all-ones
  input, pruned iteratively over ``iterations`` rounds to an exponentially decaying density
  (avoids layer collapse).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from ..modules import tensor_owner
from .masks import Masks, keep_largest_global, set_masks
from ..metrics import call_model, logits_of, to_device

METHODS = ("snip", "grasp", "synflow")


def _params(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    return [getattr(*tensor_owner(model, n)) for n in names]


def _keep_global(scores: dict[str, torch.Tensor], masks: Masks, density: float) -> Masks:
    """Keep the top ``density`` fraction (of all weights in ``masks``) by score, among unmasked ones."""
    return keep_largest_global(scores, masks, int(round(sum(m.numel() for m in masks.values()) * density)))


def _loss(net: nn.Module, xb, yb, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of one ``(inputs, targets)`` batch (inputs a tensor, tuple or dict of tensors),
    on the network's device."""
    device = next(net.parameters()).device
    return F.cross_entropy(logits_of(call_model(net, to_device(xb, device))) / temperature, yb.to(device))


def snip_scores(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(model)
    net.zero_grad()
    for xb, yb in batches:
        _loss(net, xb, yb).backward()
    return {n: (p.grad * p).detach().abs() for n, p in zip(names, _params(net, names))}


def grasp_scores(model: nn.Module, names: list[str], batches, temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """−θ ⊙ Hg: g from a first pass (detached), then ∂(gᵀ ∂L/∂θ)/∂θ = H g. Logits are divided by
    ``temperature`` (200, as the authors' code does) so the softmax is not saturated at init."""
    net = copy.deepcopy(model)
    params = _params(net, names)
    g = [torch.zeros_like(p) for p in params]
    for xb, yb in batches:
        grads = torch.autograd.grad(_loss(net, xb, yb, temperature), params)
        g = [a + b.detach() for a, b in zip(g, grads)]
    net.zero_grad()
    for xb, yb in batches:
        grads = torch.autograd.grad(_loss(net, xb, yb, temperature), params, create_graph=True)
        sum(((gi * gr).sum() for gi, gr in zip(g, grads))).backward()
    return {n: (-p * p.grad).detach() for n, p in zip(names, params)}


def synflow_scores(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.state_dict().values():
            if p.is_floating_point():
                p.abs_()
    net.zero_grad()
    logits_of(net(torch.ones(1, *input_shape, dtype=torch.double))).sum().backward()
    return {n: (p.grad * p).detach().abs().float() for n, p in zip(names, _params(net, names))}


def prune_at_init(model: nn.Module, masks: Masks, method: str, density: float, batches=None,
                  input_shape: tuple[int, ...] | None = None, iterations: int = 100) -> Masks:
    """Masks that keep ``density`` of the weights in ``masks`` (fraction of all of them), chosen at
    init by ``method``. ``batches`` (list of (x, y)) feed SNIP / GraSP; SynFlow needs ``input_shape``."""
    names = list(masks)
    net = copy.deepcopy(model)
    set_masks(net, masks)
    if method == "snip":
        return _keep_global(snip_scores(net, names, batches), masks, density)
    if method == "grasp":  # remove the highest −θ·Hg: keep the highest θ·Hg
        return _keep_global({n: -s for n, s in grasp_scores(net, names, batches).items()}, masks, density)
    if method == "synflow":
        current = dict(masks)
        start = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        for k in range(1, iterations + 1):
            d = start * (density / start) ** (k / iterations)  # exponential schedule
            set_masks(net, current)
            current = _keep_global(synflow_scores(net, names, input_shape), current, d)
        return current
    raise ValueError(f"unknown pruning-at-init method {method!r} (known: {', '.join(METHODS)})")
