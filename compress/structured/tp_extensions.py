"""Our extension of Torch-Pruning: what its dependency graph gets wrong, contained.

Torch-Pruning (1.5/1.6) traces ``torch.cat``/``split``/``chunk``/``view`` into index mappings that
hold for plain CNNs, but not for every model users bring. What goes wrong, found with the small
reproductions in ``tests/test_prune_coverage_classes.py``:

* **Channel shuffle** (``view(b, g, c/g, h, w) -> transpose -> flatten``, ShuffleNet): the reshape
  mapping divides by an inferred channel count of 0 (``ZeroDivisionError`` while the graph is
  built), so no model with a shuffle can even be analysed.
* **Splits whose parts are pruned unevenly** (``chunk(2)``, CSP/Res2Net halves, ``split`` with
  sizes): the graph prunes each part by its own ranking, but ``chunk`` splits at half the new width
  and a hard-coded ``split_with_sizes`` still uses the old sizes, so forward breaks; the importance
  of a group that spans a split is gathered with stale offsets (``IndexError: index 256 is out of
  bounds for dimension 0 with size 256``).
* **Index mappings over the wrong axis** (token-mixing Linears of MLP-mixers act on the patch
  axis; reshapes that fold channels into heads): indices of one axis are mapped onto another
  (``index 384 ... size 196``).

Rather than patching Torch-Pruning's source, this module (1) keeps a graph-build step that fails
from failing the whole analysis (the op simply gets no index mapping: its channels are treated as
coupled one-to-one, which the forward check after pruning then confirms or refuses), and (2) gives
the pruner the hooks :class:`compress.structured.pruner.GuardedPruner` uses to prune group by
group *transactionally*: snapshot the modules, cut, patch constants forward reads, run the model,
and roll the group back (reporting why) when it does not run. A group is never half-applied.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch_pruning as tp
from torch import nn

_GUARDED_UPDATERS = ("update_reshape_index_mapping", "update_concat_index_mapping", "update_split_index_mapping",
                     "update_unbind_index_mapping", "update_expand_index_mapping", "update_slice_index_mapping",
                     "update_flatten_index_mapping")
GRAPH_WARNINGS: list[str] = []  # what the guarded updaters swallowed, most recent last (bounded)


def install_graph_guards() -> None:
    """Make each of Torch-Pruning's index-mapping updaters fail soft: an op whose mapping cannot be
    computed keeps the default (one-to-one) mapping instead of aborting the graph build. Idempotent;
    it changes behaviour only where Torch-Pruning would have raised."""
    mod = tp.dependency.index_mapping
    for name in _GUARDED_UPDATERS:
        fn = getattr(mod, name, None)
        if fn is None or getattr(fn, "_compress_guarded", False):
            continue

        def guarded(graph, node, _fn=fn, _name=name):
            try:
                return _fn(graph, node)
            except (ArithmeticError, IndexError, TypeError, ValueError) as exc:
                GRAPH_WARNINGS.append(f"{_name} on {node}: {type(exc).__name__}: {exc}")
                del GRAPH_WARNINGS[:-50]
                return None

        functools.update_wrapper(guarded, fn)
        guarded._compress_guarded = True
        setattr(mod, name, guarded)
    _guard_group_building(tp.dependency.DependencyGraph)


def _guard_group_building(cls) -> None:
    """A group whose index propagation fails (a mapping with stale offsets, an index past a layer's
    width) comes back empty and is recorded in ``graph.group_failures`` as (root module, reason);
    ``get_all_groups`` leaves empty groups out. Torch-Pruning's pruner builds all groups inside its
    constructor and its step generator, where one exception would end the whole analysis."""
    build = cls.get_pruning_group
    if getattr(build, "_compress_guarded", False):
        return

    @functools.wraps(build)
    def get_pruning_group(self, module, pruning_fn, idxs):
        try:
            return build(self, module, pruning_fn, idxs)
        except Exception as exc:  # any error inside Torch-Pruning's propagation: skip this group
            failures = self.__dict__.setdefault("group_failures", [])
            failures.append((module, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"))
            empty = tp.dependency.Group()
            empty._DG = self
            return empty

    all_groups = cls.get_all_groups

    @functools.wraps(all_groups)
    def get_all_groups(self, *args, **kwargs):
        for group in all_groups(self, *args, **kwargs):
            if len(group):
                yield group

    get_pruning_group._compress_guarded = True
    cls.get_pruning_group = get_pruning_group
    cls.get_all_groups = get_all_groups


# ---------------------------------------------------------------------------------------------
# Transactions: snapshot what a group's cut changes, so it can be undone exactly.

def _module_state(m: nn.Module) -> dict:
    d = dict(m.__dict__)
    d["_parameters"] = dict(m._parameters)
    d["_buffers"] = dict(m._buffers)
    for k, v in list(d.items()):
        if isinstance(v, list):
            d[k] = list(v)
    return d


class Snapshot:
    """The attributes, parameters and buffers of every module of ``model`` and of the graph's own
    op nodes (concat/split sizes), plus the graph's parameter bookkeeping. Torch-Pruning replaces
    pruned tensors by new ``Parameter`` objects, so holding references is enough (no copies)."""

    def __init__(self, model: nn.Module, DG: Any = None):
        self.modules = {m: _module_state(m) for m in model.modules()}
        self.DG = DG
        if DG is not None:
            for node in DG.module2node.values():
                if isinstance(node.module, nn.Module) and node.module not in self.modules:
                    self.modules[node.module] = _module_state(node.module)
            self.module2node = dict(DG.module2node)
            self.param_to_name = dict(DG._param_to_name)
            self.node_modules = {id(n): (n, n.module) for n in DG.module2node.values()}
            self.history = len(DG._pruning_history) if hasattr(DG, "_pruning_history") else None

    def restore(self) -> None:
        for m, state in self.modules.items():
            m.__dict__.clear()
            m.__dict__.update(state)
        DG = self.DG
        if DG is not None:
            DG.module2node.clear()
            DG.module2node.update(self.module2node)
            DG._param_to_name.clear()
            DG._param_to_name.update(self.param_to_name)
            for node, module in self.node_modules.values():
                node.module = module
            if self.history is not None:
                del DG._pruning_history[self.history:]


def width_changes(DG: Any, group) -> dict[int, set[int]]:
    """old width -> new widths of every layer the group cuts (called before it is cut)."""
    changes: dict[int, set[int]] = {}
    for dep, idxs in group:
        mod = dep.target.module
        if not isinstance(mod, nn.Module) or not idxs:
            continue
        try:
            old = DG.get_out_channels(mod) if DG.is_out_channel_pruning_fn(dep.handler) else DG.get_in_channels(mod)
        except Exception:  # a custom op without a channel count
            continue
        if isinstance(old, int) and old > len(idxs):
            changes.setdefault(old, set()).add(old - len(set(idxs)))
    return changes


def split_sizes(DG: Any) -> dict[Any, list[int]]:
    """The graph's split/chunk op nodes and their current part sizes."""
    out = {}
    for node in DG.module2node.values():
        sizes = getattr(node.module, "split_sizes", None)
        if isinstance(sizes, list) and sizes and all(isinstance(s, int) for s in sizes):
            out[node.module] = list(sizes)
    return out


_PASS_THROUGH = ("BN", "ELEMENTWISE", "PRELU", "LN", "GN", "IN", "DEPTHWISE_CONV")


def equal_split_producers(DG: Any) -> dict[nn.Module, int]:
    """Layers whose output is cut into equal parts (``chunk``, ``split(n)``, CSP halves): module ->
    number of parts. Torch-Pruning ranks such a width as one, so the parts lose different numbers
    of channels and ``chunk`` then splits at the wrong place (or a split size no longer sums);
    pruning the same channels in every part (channel groups = parts) keeps the parts equal."""
    types = {getattr(tp.ops.OPTYPE, t) for t in _PASS_THROUGH if hasattr(tp.ops.OPTYPE, t)}
    out: dict[nn.Module, int] = {}
    for node in list(DG.module2node.values()):
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        sizes = getattr(node.module, "split_sizes", None)
        if not sizes or len(sizes) < 2 or len(set(sizes)) != 1:
            continue
        n, stack, seen = len(sizes), list(node.inputs), set()
        while stack:
            src = stack.pop()
            if id(src) in seen:
                continue
            seen.add(id(src))
            if src.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR) and isinstance(src.module, nn.Module):
                prev = out.get(src.module, 1)
                out[src.module] = prev * n // math.gcd(prev, n)
            elif src.type in types:
                stack.extend(src.inputs)
    return out
