"""SparseGPT N:M masks (Frantar & Alistarh, 2023): second-order (OBS) pruning with error compensation.

Per layer, the input Hessian of the layer-wise reconstruction loss ``||W X - W' X||^2`` is
``H = 2 X X^T`` over the calibration inputs. Columns (reduction-dim entries) are processed in
blocks; in every group of ``m`` columns the ``n`` weights with the smallest OBS saliency
``w^2 / [H^-1]_jj^2`` are zeroed, and each zeroed column's error is spread over the columns not yet
processed through the Cholesky factor of ``H^-1``, so the layer's output changes as little as
possible.

The column order is the layout TensorRT reads: for a Conv weight ``[K, C, R, S]`` the columns are
ordered ``(r, s, c)`` with ``c`` fastest, so a group of ``m`` consecutive columns is ``m``
consecutive input channels at one spatial position (the same groups :func:`compress.sparsity.n_m.n_m_mask` uses),
and the inputs are unfolded (im2col) into the same order.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..metrics import batch_inputs, call_model, to_device


def conv_columns(module: nn.Conv2d, x: torch.Tensor) -> list[torch.Tensor]:
    """im2col of a conv input, one ``[rows, R*S*C_g]`` matrix per group, columns in (r, s, c) order."""
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)  # [N, C*R*S, L], order (c, r, s)
    n, _, length = cols.shape
    g = module.groups
    cg = module.in_channels // g
    rs = module.kernel_size[0] * module.kernel_size[1]
    cols = cols.reshape(n, g, cg, rs, length).permute(1, 0, 4, 3, 2)  # [g, N, L, RS, Cg]
    return [c.reshape(n * length, rs * cg) for c in cols]


def weight_rows(module: nn.Module) -> list[torch.Tensor]:
    """The weight as ``[out, cols]`` matrices (one per conv group), columns in the Hessian's order."""
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return [w.clone()]
    g = module.groups
    k = w.shape[0] // g
    wr = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # [K, R*S*Cg], order (r, s, c)
    return [wr[i * k:(i + 1) * k].clone() for i in range(g)]


def _to_weight(module: nn.Module, rows: list[torch.Tensor]) -> torch.Tensor:
    w = module.weight
    if isinstance(module, nn.Linear):
        return rows[0].reshape(w.shape)
    k, cg, r, s = w.shape
    return torch.cat(rows, 0).reshape(k, r, s, cg).permute(0, 3, 1, 2).contiguous()


class HessianCollector:
    """Forward pre-hooks that accumulate ``X^T X`` per layer (and per conv group) on the input's
    device: float64 on CPU (exact for small models), float32 on GPU (as the reference does)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.h: dict[str, list[torch.Tensor]] = {}
        self.count: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            mats = conv_columns(module, x) if isinstance(module, nn.Conv2d) else [x.reshape(-1, x.shape[-1])]
            dtype = torch.float64 if x.device.type == "cpu" else torch.float32
            acc = self.h.setdefault(name, [torch.zeros(a.shape[1], a.shape[1], dtype=dtype, device=x.device)
                                           for a in mats])
            for i, a in enumerate(mats):
                a = a.to(dtype)
                acc[i] += a.T @ a
            self.count[name] = self.count.get(name, 0) + mats[0].shape[0]

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def hessians(self, name: str) -> list[torch.Tensor]:
        n = max(1, self.count.get(name, 0))
        return [2.0 * h / n for h in self.h[name]]


def prune_matrix(w: torch.Tensor, h: torch.Tensor, n: int, m: int, block: int = 128,
                 damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[rows, cols]`` matrix with Hessian ``h`` ``[cols, cols]``: returns
    ``(pruned weight, mask)`` holding N:M: at most ``n`` non-zeros (``m - n`` zeros) in every group of
    ``m`` consecutive columns (the convention of :mod:`compress.sparsity.n_m`)."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    rows, cols = w.shape
    if cols % m:
        raise ValueError(f"reduction dim {cols} is not a multiple of {m}")
    block = max(m, block - block % m)
    dtype = w.dtype
    work = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    w = w.to(work).clone()
    h = h.to(device=w.device, dtype=work).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    # upper Cholesky factor of H^-1: row j holds the OBS update for column j given columns < j fixed
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        for i in range(i2 - i1):
            if i % m == 0:  # choose this group's m - n zeros from the error-compensated weights
                score = w1[:, i:i + m] ** 2 / d1[i:i + m].unsqueeze(0) ** 2
                drop = torch.topk(score, m - n, dim=1, largest=False).indices
                mask[:, i1 + i:i1 + i + m].scatter_(1, drop, False)
            col = w1[:, i]
            q = col * mask[:, i1 + i]
            q1[:, i] = q
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(dtype), mask.to(dtype)


@torch.no_grad()
def sparsegpt_masks(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable, n: int = 2, m: int = 4,
                    block: int = 128, damp: float = 0.01, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Collect the Hessians of ``layers`` on ``batches`` (``(inputs, targets)`` pairs with inputs a
    tensor, a tuple or a dict of tensors, or bare tensor/dict inputs: :func:`compress.metrics.batch_inputs`) in one
    forward pass of the dense model, then prune each layer: its weight is replaced by the
    error-compensated sparse weight, holding N:M (at most ``n`` non-zeros per ``m``). Returns
    ``{layer name: mask}`` in the weight's shape."""
    collector = HessianCollector(layers)
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            call_model(model, to_device(batch_inputs(b), device))
    finally:
        collector.remove()
        model.train(was_training)
    out: dict[str, torch.Tensor] = {}
    for name, mod in layers.items():
        if name not in collector.h:
            raise ValueError(f"layer {name!r} saw no calibration input")
        pruned, masks_ = [], []
        for wr, h in zip(weight_rows(mod), collector.hessians(name)):
            pw, pm = prune_matrix(wr.to(h.device), h, n, m, block=block, damp=damp)
            pruned.append(pw)
            masks_.append(pm)
        mod.weight.copy_(_to_weight(mod, pruned).to(mod.weight.device))
        out[name] = _to_weight(mod, masks_)
    return out
