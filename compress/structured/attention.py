"""Attention layers under structured pruning: find them, tell Torch-Pruning how their channels are
grouped into heads, and patch the attributes their forward reads after the weights shrank.

Two families are handled:

* ``nn.MultiheadAttention``: the packed q/k/v projection's width *is* ``embed_dim`` (the residual
  stream), so heads cannot be dropped without changing the stream; what can be pruned is the
  embedding width, the same channels inside every head (``head_dim`` shrinks, head count stays).
  Torch-Pruning's MHA pruner updates ``embed_dim``/``head_dim``; we tell it the channel grouping.
  For whole-head pruning each one is first replaced by :class:`SplitMultiheadAttention` (same
  weights, same forward signature, separate q/k/v projections at an inner width of its own), which
  then prunes like the second family.
* Separate q/k/v Linears (Hugging Face ViT/Segformer style: ``q_proj``/``k_proj``/``v_proj`` or
  ``query``/``key``/``value``, with ``num_attention_heads``/``num_heads`` and ``head_dim``/
  ``attention_head_size``/``all_head_size``): whole heads and/or dims inside heads can be pruned;
  afterwards the head count and head width are written back so the reshapes in forward fit.
  ``scaling`` (1/sqrt(head_dim)) is kept: the surviving dot products are partial sums of the
  original ones, and rescaling them would move every logit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelBreakError
from ..modules import replace_submodule

_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_HEAD_COUNT = ("num_attention_heads", "num_heads")
_HEAD_WIDTH = ("head_dim", "attention_head_size")


@dataclass
class AttentionSite:
    name: str
    module: nn.Module
    kind: str                     # "mha" (nn.MultiheadAttention) or "qkv" (separate projections)
    qkv: tuple[nn.Linear, ...]    # empty for mha
    heads: int

    @property
    def head_dim(self) -> int:
        if self.kind == "mha":
            return self.module.embed_dim // self.module.num_heads
        return self.qkv[0].out_features // self.heads


def _head_count_attr(mod: nn.Module) -> str | None:
    return next((a for a in _HEAD_COUNT if isinstance(getattr(mod, a, None), int)), None)


def find_attention(model: nn.Module) -> list[AttentionSite]:
    sites = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            sites.append(AttentionSite(name, mod, "mha", (), mod.num_heads))
            continue
        count = _head_count_attr(mod)
        if count is None:
            continue
        for names in _QKV_NAMES:
            projs = tuple(getattr(mod, n, None) for n in names)
            if all(isinstance(p, nn.Linear) for p in projs):
                sites.append(AttentionSite(name, mod, "qkv", projs, getattr(mod, count)))
                break
    return sites


def pruner_kwargs(sites: list[AttentionSite], heads_ratio: float, head_dims: bool) -> dict:
    """Torch-Pruning arguments: head counts of the q/k/v linears, channel grouping of MHA modules."""
    num_heads = {p: s.heads for s in sites if s.kind == "qkv" for p in s.qkv}
    groups = {s.module: s.heads for s in sites if s.kind == "mha" and s.heads > 1}
    kw: dict = {"num_heads": num_heads, "out_channel_groups": dict(groups), "in_channel_groups": dict(groups)}
    if num_heads:
        kw.update(prune_num_heads=heads_ratio > 0, head_pruning_ratio=heads_ratio, prune_head_dims=head_dims)
    return kw


def patch_attention(sites: list[AttentionSite], heads_after: dict[nn.Module, int]) -> list[dict]:
    """Write the new head count/width into every q/k/v attention module; returns what changed."""
    changes = []
    for s in sites:
        if s.kind == "mha":
            m = s.module
            if m.embed_dim % m.num_heads:
                raise ModelBreakError(f"{s.name}: embed_dim {m.embed_dim} is not a multiple of num_heads {m.num_heads}")
            m.head_dim = m.embed_dim // m.num_heads
            changes.append({"module": s.name, "heads": m.num_heads, "head_dim": m.head_dim})
            continue
        q, k, v = s.qkv
        heads = heads_after.get(q, s.heads)
        widths = {q.out_features, k.out_features, v.out_features}
        if len(widths) != 1 or q.out_features % heads:
            raise ModelBreakError(f"{s.name}: q/k/v widths {sorted(widths)} do not split into {heads} heads")
        head_dim = q.out_features // heads
        mod = s.module
        for a in _HEAD_COUNT:
            if isinstance(getattr(mod, a, None), int):
                setattr(mod, a, heads)
        for a in _HEAD_WIDTH:
            if isinstance(getattr(mod, a, None), int):
                setattr(mod, a, head_dim)
        if isinstance(getattr(mod, "all_head_size", None), int):
            mod.all_head_size = q.out_features
        changes.append({"module": s.name, "heads_before": s.heads, "heads": heads, "head_dim": head_dim})
        s.heads = heads
    return changes


def patch_config(model: nn.Module, sites: list[AttentionSite]) -> None:
    """Keep a Hugging Face ``config`` truthful where one number describes every layer."""
    cfg = getattr(model, "config", None)
    qkv = [s for s in sites if s.kind == "qkv"]
    if cfg is None or not qkv:
        return
    heads = {s.heads for s in qkv}
    if isinstance(getattr(cfg, "num_attention_heads", None), int) and len(heads) == 1:
        cfg.num_attention_heads = heads.pop()
        widths = {s.head_dim for s in qkv}
        if len(widths) == 1 and hasattr(cfg, "head_dim"):
            cfg.head_dim = widths.pop()


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention with separate projections, so whole heads can go.

class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward (same arguments, same outputs) over separate ``q_proj``/
    ``k_proj``/``v_proj`` Linears whose width is ``num_heads * head_dim``, independent of
    ``embed_dim``: torch's own module computes the heads at the residual width, so it cannot lose a
    head. Written out here (not a torch class) because no library module has both the MHA call
    signature and an inner width of its own. ``scaling`` stays ``1/sqrt(original head_dim)``: the
    surviving dot products are partial sums of the original ones (see the module docstring).
    The ``in_proj_*``/``_qkv_same_embed_dim`` attributes steer ``nn.TransformerEncoderLayer`` off
    its fused fast path, which reads the packed weights."""

    _qkv_same_embed_dim = False
    portable_replacement = "split_multihead_attention"  # model_io rebuilds it from the factory's MHA
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn are not supported")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, bias=bias, dropout=mha.dropout,
                  batch_first=mha.batch_first)
        w = (mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim
             else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        b = mha.in_proj_bias.chunk(3) if bias else (None, None, None)
        with torch.no_grad():
            for proj, wi, bi in zip((new.q_proj, new.k_proj, new.v_proj), w, b):
                proj.weight.copy_(wi)
                if bi is not None:
                    proj.bias.copy_(bi)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device).train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(n, tgt, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(key).view(n, src, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(value).view(n, src, self.num_heads, -1).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
        for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
            if mask is None:
                continue
            if mask.dim() == 3:
                raise ValueError("a 3-D attn_mask (one per head) does not fit a model whose heads were pruned; "
                                 "pass a 2-D mask")
            scores = (scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool
                      else scores + mask.to(scores.dtype))
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(n, tgt, -1)
        out = self.out_proj(out)
        if unbatched:
            out, weights = out.squeeze(0), weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(-3) if average_attn_weights else weights)


def split_multihead_attention(model: nn.Module) -> list[dict]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by an equivalent
    :class:`SplitMultiheadAttention`; returns what was replaced and what was left, with the reason."""
    done = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        try:
            new = SplitMultiheadAttention.from_torch(mod)
        except ValueError as exc:
            done.append({"module": name, "replaced": False, "reason": str(exc)})
            continue
        replace_submodule(model, name, new)
        done.append({"module": name, "replaced": True, "heads": new.num_heads})
    return done
