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
* **Reshapes of token/head axes taken for channel flattens** (windowed attention: the scores
  ``(B, heads, N, N)``, the relative-position bias ``(N*N, heads)``): Torch-Pruning 1.6 checks a
  reshape's input shape through ``grad_fn._saved_self_sizes``, which torch 2 renamed to
  ``_saved_self_sym_sizes``, so the check never runs and, in a model where no ``nn.Linear`` sees a
  3-D input (its switch for turning reshape mappings off), every reshape whose neighbours' inferred
  channel counts differ gets a flatten mapping. On Swin those couple the heads to the channels
  with a stride; the mappings sit on a cycle, so each pass multiplies the indices by the stride
  and enumerating the groups of swin_t did not end in minutes (and the groups were wrong).
  :func:`reshape_index_mapping` installs a flatten mapping only where the reshape's input and
  output shapes (the latter recorded while the graph is traced) show it merges the channel axis
  with the axes after it, or splits it into (channels, rest).
* **A walk that grows combinatorially and repeats itself**: :func:`propagate_group` (each
  (layer, index) visited once; ReXNet) and :func:`_skip_when_unchanged` (index mappings recomputed
  only when a width changed; Torch-Pruning recomputes all of them for every group it builds).
  Tests: ``tests/test_prune_graph_walk.py``.

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

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

_GUARDED_UPDATERS = ("update_reshape_index_mapping", "update_concat_index_mapping", "update_split_index_mapping",
                     "update_unbind_index_mapping", "update_expand_index_mapping", "update_slice_index_mapping",
                     "update_flatten_index_mapping")
GRAPH_WARNINGS: list[str] = []  # what the guarded updaters swallowed, most recent last (bounded)


def _input_sizes(node) -> tuple[int, ...] | None:
    """The shape of a reshape op's input, as autograd saved it (torch 2: ``_saved_self_sym_sizes``)."""
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        sizes = getattr(node.grad_fn, attr, None)
        if sizes is not None:
            try:
                return tuple(int(s) for s in sizes)
            except (TypeError, ValueError):  # symbolic sizes: no shape to check against
                return None
    return None


def _reshape_is_channel_flatten(sizes: tuple[int, ...] | None, out: tuple[int, ...] | None,
                                c_in: int, c_out: int) -> bool:
    """Whether a reshape from shape ``sizes`` to shape ``out`` maps ``c_in`` channels to ``c_out``
    the way a flatten mapping says: channel ``c`` of the narrower side is the block
    ``[c*s, (c+1)*s)`` of the wider one. That holds when the channel axis keeps its place and
    everything before it (``out[:k] == sizes[:k]``) and is merged with the axes after it (flatten,
    ``(B, C, H, W) -> (B, C*H*W)``) or split into ``(c_out, s)`` (unflatten), the channels being the
    major factor. It does not hold for attention scores ``(B, heads, N, N)`` whose heads were taken
    for channels, for the bias table ``(N*N, heads)``, nor for a fused q/k/v projection reshaped to
    ``(B, N, 3, heads, head_dim)`` (there channel ``c`` of q is row ``c``, not rows ``3c..3c+2``).
    Without the output shape (not recorded), only the input side is checked."""
    if sizes is None or len(sizes) <= 1:  # no shape recorded, or a 1-D tensor: Torch-Pruning's own rule
        return True
    for k in range(1, len(sizes)):
        if sizes[k] != c_in:
            continue
        if out is not None:
            if len(out) > k and tuple(out[:k]) == tuple(sizes[:k]) and out[k] == c_out:
                return True
            continue
        if c_out < c_in or math.prod(sizes[k + 1:]) == c_out // c_in:
            return True
    return False


_RESHAPE_GRAD_FNS = ("view", "reshape", "flatten", "alias")


class _ReshapeOutputShapes(TorchFunctionMode):
    """Records the output shape of every view/reshape while Torch-Pruning traces the model (autograd
    saves only a reshape's input shape), keyed by the output's ``grad_fn``, the object the graph's
    reshape node holds."""

    def __init__(self, store: dict):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        fn = getattr(result, "grad_fn", None) if isinstance(result, torch.Tensor) else None
        if fn is not None and any(k in fn.name().lower() for k in _RESHAPE_GRAD_FNS):
            self.store[fn] = tuple(result.shape)
        return result


def reshape_index_mapping(graph, node) -> None:
    """Replacement for Torch-Pruning's ``update_reshape_index_mapping`` (same switch, same channel
    inference, same :class:`_FlattenIndexMapping`), that installs the mapping only when the
    reshape's real shapes fit it (:func:`_reshape_is_channel_flatten`): it installs a subset of the
    mappings Torch-Pruning would. Written here, not in Torch-Pruning's tree,
    because its own check reads an autograd attribute that torch 2 no longer has (see the module
    docstring); a reshape left without a mapping couples its channels one-to-one, which the forward
    check after each cut confirms or refuses."""
    if node.type != tp.ops.OPTYPE.RESHAPE or not getattr(graph, "_2d_4d", True):
        return  # Torch-Pruning's own switch: no reshape mappings once a Linear saw a 3-D input
    infer = tp.dependency.shape_infer
    limit = tp.dependency.constants.MAX_RECURSION_DEPTH

    def first_known(nodes, fn):
        for n in nodes:
            depth = [0]
            ch = fn(graph, n, depth)
            if depth[0] > limit:
                return None
            if ch is not None:
                return ch
        return None

    c_out = first_known(node.outputs, infer.infer_in_channels_recursively)
    c_in = first_known(node.inputs, infer.infer_out_channels_recursively)
    if not c_out or not c_in or c_out == c_in:
        return
    if max(c_in, c_out) % min(c_in, c_out):
        return
    out = graph.__dict__.get("_compress_reshape_out", {}).get(node.grad_fn)
    if not _reshape_is_channel_flatten(_input_sizes(node), out, c_in, c_out):
        GRAPH_WARNINGS.append(f"reshape {node.name}: {_input_sizes(node)} -> {out} does not map {c_in} channels "
                              f"to {c_out}: no index mapping")
        del GRAPH_WARNINGS[:-50]
        return
    mapping = tp.dependency.index_mapping._FlattenIndexMapping
    if c_out > c_in:  # the input's channels are the major factor of the output's
        narrow, stride = node.inputs, c_out // c_in
    else:  # the output's channels are the major factor of the input's
        narrow, stride = node.outputs, c_in // c_out
    for other in narrow:
        for dep in node.dependencies:
            if dep.target == other:
                dep.index_mapping[0] = mapping(stride=stride, reverse=True)
        for dep in other.dependencies:
            if dep.target == node:
                dep.index_mapping[0] = mapping(stride=stride, reverse=False)


def install_graph_guards() -> None:
    """Make each of Torch-Pruning's index-mapping updaters fail soft: an op whose mapping cannot be
    computed keeps the default (one-to-one) mapping instead of aborting the graph build. Idempotent;
    it changes behaviour only where Torch-Pruning would have raised. The reshape updater is first
    replaced by :func:`reshape_index_mapping`."""
    mod = tp.dependency.index_mapping
    _record_reshape_shapes(tp.dependency.DependencyGraph)
    if not getattr(mod.update_reshape_index_mapping, "_compress_guarded", False):
        mod.update_reshape_index_mapping = reshape_index_mapping
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
    if not getattr(mod.update_index_mapping, "_compress_guarded", False):
        mod.update_index_mapping = _skip_when_unchanged(mod.update_index_mapping)
    _guard_group_building(tp.dependency.DependencyGraph)


def _simple_attrs(obj) -> tuple:
    return tuple((k, v) for k, v in vars(obj).items()
                 if isinstance(v, (int, float, str, tuple, list)) and not k.startswith("_"))


def graph_widths(graph) -> tuple:
    """Everything the index mappings are computed from: the parameter shapes and the int/size
    attributes (``out_features``, ``normalized_shape``, a concat's or split's sizes) of every node."""
    key = []
    for node in graph.module2node.values():
        m = node.module
        if isinstance(m, nn.Parameter):
            key.append(tuple(m.shape))
        elif isinstance(m, nn.Module):
            key.append((tuple(tuple(p.shape) for p in m._parameters.values() if p is not None),
                        _simple_attrs(m)))
        else:
            key.append(None)
    return tuple(key)


def _skip_when_unchanged(update):
    """Torch-Pruning recomputes every index mapping of the graph each time it builds a group
    (``get_pruning_group``), with shape inference that walks back through the graph from every
    reshape/concat/expand node: on swin_t (about 2,000 nodes) one update takes 1-2 s, and a pruning
    step builds a few hundred groups. The mappings are a function of the layer widths and op
    sizes only, so an update is skipped while :func:`graph_widths` is what it was at the graph's
    last update (a cut, or a rolled-back cut, changes it and the next group recomputes). During
    an update no width changes, so the graph's per-node channel look-ups, which the shape inference
    repeats about a hundred times per node, are memoised for its duration (same call tree, same
    results: only the look-ups are cached, not the depth-limited recursion)."""

    @functools.wraps(update)
    def update_index_mapping(graph):
        key = graph_widths(graph)
        if graph.__dict__.get("_compress_widths") == key:
            return None
        for name in ("get_out_channels", "get_in_channels"):
            graph.__dict__[name] = _memoised(getattr(graph, name))
        try:
            result = update(graph)
        finally:
            graph.__dict__.pop("get_out_channels", None)
            graph.__dict__.pop("get_in_channels", None)
        graph.__dict__["_compress_widths"] = key
        return result

    update_index_mapping._compress_guarded = True
    return update_index_mapping


def _memoised(lookup):
    cache: dict[int, Any] = {}

    def cached(module_or_node):
        k = id(module_or_node)
        if k not in cache:
            cache[k] = lookup(module_or_node)
        return cache[k]

    return cached


def _record_reshape_shapes(cls) -> None:
    """``build_dependency`` traces the model with :class:`_ReshapeOutputShapes` active, so
    :func:`reshape_index_mapping` sees both shapes of every reshape."""
    build = cls.build_dependency
    if getattr(build, "_compress_guarded", False):
        return

    @functools.wraps(build)
    def build_dependency(self, *args, **kwargs):
        store = self.__dict__.setdefault("_compress_reshape_out", {})
        with _ReshapeOutputShapes(store):
            return build(self, *args, **kwargs)

    build_dependency._compress_guarded = True
    cls.build_dependency = build_dependency


def propagate_group(DG, module: nn.Module, pruning_fn, idxs) -> "tp.dependency.Group":
    """``DependencyGraph.get_pruning_group`` with each index propagated once per layer.

    Torch-Pruning walks the dependencies depth-first and re-propagates a layer whenever it is
    reached with an index list it has not seen as a whole (indices and the root indices they came
    from); where concats, slices and residual additions meet (ReXNet's partial residual
    ``x[:, :c] + shortcut`` in every block), the same layer is reached with ever new combinations and
    the walk grows combinatorially (rexnet_100: one group had 19,000 entries for 31 layers and
    did not finish in minutes). Every index mapping acts index by index (offsets, filters,
    strides), and the group it builds is merged per layer afterwards, so propagating only the
    indices a layer has not received yet gives the same indices per layer: each (layer, index)
    is visited once. Where one index is reached from two root indices, the first one reached is
    kept, as Torch-Pruning's merge does."""
    if module not in DG.module2node:
        raise ValueError(f"module {module} is not in the dependency graph")
    if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels > 1:
        pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
    if isinstance(idxs, int):
        idxs = [idxs]
    hybrid = tp._helpers._HybridIndex
    start = [hybrid(idx=i, root_idx=i) for i in idxs]
    tp.dependency.index_mapping.update_index_mapping(DG)
    root = DG.module2node[module]
    walk = [(tp.dependency.Dependency(pruning_fn, pruning_fn, source=root, target=root), start)]
    reached: dict[tuple, set[int]] = {(root, pruning_fn): {i.idx for i in start}}
    stack = [(root, pruning_fn, start)]
    while stack:
        node, fn, current = stack.pop()
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            mapped = current
            for mapping in dep.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            seen = reached.setdefault((dep.target, dep.handler), set())
            fresh = []
            for i in mapped:
                if i.idx not in seen:
                    seen.add(i.idx)
                    fresh.append(i)
            if fresh:
                walk.append((dep, fresh))
                stack.append((dep.target, dep.handler, fresh))
    merged = tp.dependency.Group()
    ignored = {id(p) for p in DG.ignored_params}
    for dep, found in walk:
        if isinstance(dep.target.module, nn.Parameter) and id(dep.target.module) in ignored:
            continue
        merged.add_and_merge(dep, found)
    merged._DG = DG
    for k in range(len(merged)):
        dep, found = merged[k]
        item = tp._helpers.GroupItem(dep, [i.idx for i in found])
        item.root_idxs = [i.root_idx for i in found]
        merged[k] = item
    return merged


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
            return propagate_group(self, module, pruning_fn, idxs)
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
