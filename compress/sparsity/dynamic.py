"""Dynamic sparse training on the one mask system: every ``every`` steps each masked tensor drops
its smallest-magnitude active weights and grows as many inactive ones, so its density stays fixed.

- SET (Mocanu et al. 2018): grow at random.
- RigL (Evci et al. 2020): grow where the dense gradient is largest (computed on a fresh batch).

The fraction updated decays with a cosine from ``alpha`` to 0 at ``end_step``; grown weights start
at zero (their optimizer state is already zero, masked positions keep none).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import masks as mask_core
from ..modules import tensor_owner
from ..metrics import call_model, logits_of, to_device

METHODS = ("set", "rigl")


class DynamicSparsity:
    """An ``on_step(step, model, opt)`` callback for :func:`compress.core.training.train`."""

    def __init__(self, names: list[str], method: str, every: int, end_step: int, alpha: float = 0.3,
                 seed: int = 0, grad_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown dynamic sparse method {method!r} (known: {', '.join(METHODS)})")
        if method == "rigl" and grad_batch is None:
            raise ValueError("rigl needs grad_batch (a batch for the dense gradient)")
        self.names, self.method, self.every, self.end_step, self.alpha = names, method, every, end_step, alpha
        self.generator = torch.Generator().manual_seed(seed)
        self.grad_batch = grad_batch
        self.updates = 0

    def fraction(self, step: int) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * min(1.0, step / max(1, self.end_step))))

    def __call__(self, step: int, model: nn.Module, opt) -> None:
        if step % self.every or step >= self.end_step:
            return
        grads = self._dense_grads(model) if self.method == "rigl" else None
        f = self.fraction(step)
        with torch.no_grad():
            for name in self.names:
                mod, pname = tensor_owner(model, name)
                w, mask = getattr(mod, pname), mod._buffers[pname + mask_core.SUFFIX]
                active = int(mask.sum())
                k = min(int(round(f * active)), mask.numel() - active)
                if k <= 0:
                    continue
                flat_mask = mask.flatten()
                drop_score = torch.where(flat_mask > 0, w.detach().abs().flatten(), torch.full_like(flat_mask, math.inf))
                drop = torch.topk(drop_score, k, largest=False).indices
                new = flat_mask.clone()
                new[drop] = 0
                # grow among weights inactive before this update (dropped ones are not regrown at once)
                if self.method == "rigl":
                    grow_score = grads[name].abs().flatten().clone()
                else:
                    grow_score = torch.rand(flat_mask.numel(), generator=self.generator).to(flat_mask.device)
                grow_score[flat_mask > 0] = -math.inf
                grow = torch.topk(grow_score, k).indices
                new[grow] = 1
                w.view(-1)[grow] = 0.0  # grown connections start at zero
                mask_core.set_mask(mod, new.view_as(mask), pname)
        mask_core.mask_optimizer_state(opt, model)
        self.updates += 1

    def _dense_grads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        xb, yb = self.grad_batch()
        device = next(model.parameters()).device
        params = [getattr(*tensor_owner(model, n)) for n in self.names]
        loss = F.cross_entropy(logits_of(call_model(model, to_device(xb, device))), yb.to(device))
        return dict(zip(self.names, torch.autograd.grad(loss, params)))
