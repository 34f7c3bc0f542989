"""Attention layers under structured pruning: find them, tell Torch-Pruning how their channels are
grouped into heads, and patch the attributes their forward reads after the weights shrank.

Two families are handled:

* ``nn.MultiheadAttention``: the packed q/k/v projection's width *is* ``embed_dim`` (the residual
  stream), so heads cannot be dropped without changing the stream; what can be pruned is the
  embedding width, the same channels inside every head (``head_dim`` shrinks, head count stays).
  Torch-Pruning's MHA pruner updates ``embed_dim``/``head_dim``; we tell it the channel grouping.
* Separate q/k/v Linears (Hugging Face ViT/Segformer style: ``q_proj``/``k_proj``/``v_proj`` or
  ``query``/``key``/``value``, with ``num_attention_heads``/``num_heads`` and ``head_dim``/
  ``attention_head_size``/``all_head_size``): whole heads and/or dims inside heads can be pruned;
  afterwards the head count and head width are written back so the reshapes in forward fit.
  ``scaling`` (1/sqrt(head_dim)) is kept: the surviving dot products are partial sums of the
  original ones, and rescaling them would move every logit.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelBreakError

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
