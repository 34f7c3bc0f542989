"""N:M semi-structured sparsity along the reduction (input-channel) dimension, the layout TensorRT
and cuSPARSELt read.

Convention (NVIDIA's, used everywhere in compress: the ``sparsify`` stage's ``pattern``, the
ONNX check ``compress check-sparsity --pattern`` and every function here): **N:M means at most N
non-zero weights in every group of M consecutive weights** along the reduction axis. ``2:4`` keeps
2 of 4 (50 % zeros), ``1:4`` keeps 1 of 4 (75 % zeros), ``4:8`` keeps 4 of 8. A valid pattern has
``0 < N < M``."""
from __future__ import annotations

import numpy as np
import torch


def parse_pattern(text: str) -> tuple[int, int]:
    """``"N:M"`` -> ``(n, m)``; ValueError unless both are integers with ``0 < N < M``."""
    try:
        n, m = (int(p) for p in str(text).split(":"))
    except ValueError:
        raise ValueError(f"must look like N:M (at most N non-zeros in every M weights), e.g. 2:4; got {text!r}") \
            from None
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M (N = non-zeros kept per group of M), got {text!r}")
    return n, m


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
    """A 0/1 mask keeping the ``n`` highest-scoring weights in every group of ``m`` consecutive
    input channels (N:M: ``m - n`` zeros per group). Scores default to |w|; ties resolve to the
    lower index."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    s = (weight.abs() if scores is None else scores).detach()
    r = reduction_last(s)
    c = r.shape[-1]
    if c % m:
        raise ValueError(f"reduction dim {c} is not a multiple of {m}")
    groups = r.reshape(*r.shape[:-1], c // m, m)
    keep = torch.topk(groups, n, dim=-1, largest=True, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=weight.dtype)
    mask.scatter_(-1, keep, 1.0)
    return from_reduction_last(mask.reshape(r.shape), weight).contiguous()


def n_m_check(weight, axis: int, n: int = 2, m: int = 4) -> tuple[bool, float]:
    """``(every group holds N:M, fraction of groups that do)`` for groups of ``m`` consecutive
    elements along ``axis``: a group holds N:M when it has at most ``n`` non-zeros. A tensor whose
    ``axis`` is not a multiple of ``m`` cannot hold the pattern: ``(False, 0.0)``. Accepts torch
    tensors and numpy arrays."""
    nz = weight != 0  # a fresh bool array/tensor either way
    t = (torch.from_numpy(np.asarray(nz)) if not isinstance(nz, torch.Tensor) else nz).movedim(axis, -1)
    c = t.shape[-1]
    if c % m or t.numel() == 0:
        return False, 0.0
    nonzeros = t.reshape(-1, c // m, m).sum(-1)
    ok = nonzeros <= n
    return bool(ok.all()), float(ok.float().mean())


def is_n_m_sparse(weight: torch.Tensor, axis: int, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive elements along ``axis`` has at most ``n``
    non-zeros (N:M, see the module docstring)."""
    return n_m_check(weight, axis, n, m)[0]
