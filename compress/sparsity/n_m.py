"""N:M (2:4) patterns along the reduction (input-channel) dimension, the layout TensorRT and
cuSPARSELt read: ``N`` zeros in every group of ``M`` consecutive input channels."""
from __future__ import annotations

import torch


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
