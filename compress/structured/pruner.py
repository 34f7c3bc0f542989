"""Structured (channel) pruning on Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023).

Coupled layers (a residual addition, a concat, a depthwise conv, a BN after a conv) form one
*group* that loses the same channel indices together, so the pruned model stays valid. Criteria
live in :mod:`compress.structured.criteria`; Torch-Pruning internals are reached only through
:mod:`compress.structured.tp_compat`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from ..errors import InputError, ModelBreakError
from ..metrics import call_model, logits_of
from ..modules import match_any, out_width, output_layer
from . import attention, tp_compat, tp_extensions

tp_extensions.install_graph_guards()


def ignored_modules(model: nn.Module, patterns: Iterable[str] | None) -> list[nn.Module]:
    if patterns is not None:
        pats = list(patterns)
    else:
        out = output_layer(model)
        pats = [out] if out else []
    return [m for n, m in model.named_modules() if n and match_any(n, pats)]


def build_pruner(model: nn.Module, example_inputs: torch.Tensor, importance: tp.importance.Importance, *,
                 ratio: float, scope: str, steps: int = 1, round_to: int | None = None,
                 ignore: Iterable[str] | None = None, per_layer: dict[str, float] | None = None,
                 max_ratio: float = 1.0, module_ratios: dict[nn.Module, float] | None = None,
                 **extra) -> tp.pruner.BasePruner:
    """A Torch-Pruning pruner configured from recipe-level settings.

    ``scope``: ``uniform`` (same fraction in every group), ``global`` (one ranking across groups,
    scores normalised per group), ``per_layer`` (``per_layer`` maps module-name patterns to ratios;
    unmatched groups use ``ratio``)."""
    ratio_dict = None
    if scope == "per_layer" and per_layer:
        ratio_dict = {}
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                for pat, r in per_layer.items():
                    if match_any(name, [pat]):
                        ratio_dict[mod] = r
                        break
    if module_ratios:
        ratio_dict = {**(ratio_dict or {}), **module_ratios}
    return tp.pruner.BasePruner(
        model, example_inputs, importance=importance, global_pruning=(scope == "global"),
        pruning_ratio=ratio, pruning_ratio_dict=ratio_dict, max_pruning_ratio=max_ratio,
        iterative_steps=steps, ignored_layers=ignored_modules(model, ignore), round_to=round_to, **extra,
    )


def channel_groups(model: nn.Module, example_inputs: torch.Tensor, ignore: Iterable[str] | None = None):
    """Torch-Pruning's prunable channel groups, each as ``(group, root name, channels, members)``:
    ``members`` name the layers (``conv.out`` / ``fc.in`` for Conv and Linear) that lose channels
    together. The one walk over the dependency graph that describing, scoring and allocating share."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    ignored = set()
    for m in ignored_modules(model, ignore):
        ignored.update(m.modules())
    name_of = {m: n for n, m in model.named_modules()}
    for group in DG.get_all_groups(ignored_layers=list(ignored), root_module_types=[nn.Conv2d, nn.Linear]):
        members, seen = [], set()
        for dep, _ in group:
            mod = dep.target.module
            n = name_of.get(mod, dep.target.name)
            side = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
            key = f"{n}.{side}" if isinstance(mod, (nn.Conv2d, nn.Linear)) else n
            if key not in seen and n and not n.startswith("_"):
                seen.add(key)
                members.append(key)
        root = group[0][0].target.module
        channels = DG.get_out_channels(root) if DG.is_out_channel_pruning_fn(group[0][0].handler) else DG.get_in_channels(root)
        yield group, name_of.get(root, "?"), int(channels or 0), members


def describe_groups(model: nn.Module, example_inputs: torch.Tensor, ignore: Iterable[str] | None = None) -> list[dict]:
    """The prunable channel groups: which layers lose channels together, and how many channels."""
    return [{"root": root, "channels": channels, "members": members}
            for _, root, channels, members in channel_groups(model, example_inputs, ignore)]


# ---------------------------------------------------------------------------------------------
# Guards: practical limits that keep a pruned network sane, applied to every group Torch-Pruning
# proposes before it is cut (interactive pruning), so the limit binds exactly where it matters.

@dataclass
class Guards:
    """``first_conv_max_ratio``: the first conv keeps at least this complement of its outputs
    (None: off). ``classifier``: the output layer keeps all outputs. ``min_channels``: no group
    below this ("auto": max(8, original/16); None: off). ``round_to``: kept channels a multiple of it."""

    first_conv_max_ratio: float | None = 0.5
    classifier: bool = True
    min_channels: int | str | None = "auto"
    round_to: int | None = 8

    def floor(self, original: int) -> int:
        if self.min_channels is None:
            return 1
        if self.min_channels == "auto":
            return min(original, max(8, math.ceil(original / 16)))
        return min(original, max(1, int(self.min_channels)))


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def io_layers(model: nn.Module, example: torch.Tensor) -> tuple[str | None, str | None]:
    """(first conv, output layer) by execution order: the first Conv to run and the last
    Conv/Linear to run (a segmentation head's 1x1 conv is as much a classifier as a Linear)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if n and isinstance(m, _WEIGHTED)]
    was = model.training
    try:
        model.eval()
        call_model(model, example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    mods = dict(model.named_modules())
    first = next((n for n in order if isinstance(mods[n], (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    return first, (order[-1] if order else None)


def _executing_module_error(model: nn.Module, example: torch.Tensor) -> tuple[Any, str | None, BaseException | None]:
    """Run ``model(example)``; on failure name the innermost module that was executing."""
    stack: list[str] = []

    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:
        if stack:
            stack.pop()

    handles = []
    for n, m in model.named_modules():
        if n:  # hooks must return None, or they would replace the module's output
            handles.append(m.register_forward_pre_hook(lambda mod, i, n=n: enter(n)))
            handles.append(m.register_forward_hook(lambda mod, i, o: leave()))
    try:
        with torch.no_grad():
            return call_model(model, example), None, None
    except Exception as exc:  # any shape error inside a module
        return None, (stack[-1] if stack else None), exc
    finally:
        for h in handles:
            h.remove()


def _one_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:300] if exc is not None else "?"


def _output_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return tuple(logits_of(call_model(model, example)).shape)
    finally:
        model.train(was)


def check_model_runs(model: nn.Module, example: torch.Tensor, expected_shape: tuple[int, ...],
                     output_name: str | None = None, when: str = "after pruning") -> None:
    """Refuse a pruned model that no longer runs or whose output shape moved (ModelBreakError
    names the module and the shapes)."""
    was = model.training
    model.eval()
    try:
        out, where, exc = _executing_module_error(model, example)
    finally:
        model.train(was)
    if exc is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelBreakError(f"model no longer runs {when}: module {where or '<top level>'!r} failed: {first}")
    got = tuple(logits_of(out).shape)
    if got != tuple(expected_shape):
        raise ModelBreakError(f"{when}, output shape changed {tuple(expected_shape)} -> {got} "
                              f"(module {output_name or '?'!r} produces the output; keep the classifier guard on "
                              f"or list it in 'ignore')")


def _patch_value(new):
    """A patch's new value in a form that can be compared and hashed (split-size lists as tuples)."""
    return tuple(new) if isinstance(new, list) else new


def channel_counts(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(out, in) channels of every prunable module by name: the reference the guards and
    ``max_ratio`` are measured against when a model is pruned over several pruner instances."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=logits_of)
    out = {}
    for name, mod in model.named_modules():
        if mod in DG.module2node and DG.get_pruner_of_module(mod) is not None:
            o, i = DG.get_out_channels(mod), DG.get_in_channels(mod)
            if o is not None and i is not None:
                out[name] = (int(o), int(i))
    return out


class GuardedPruner:
    """Torch-Pruning's pruner plus the guards, attention patching and a record of what bound."""

    def __init__(self, model: nn.Module, example: torch.Tensor, importance, *, ratio: float, scope: str,
                 steps: int = 1, per_layer: dict[str, float] | None = None, ignore: Iterable[str] | None = None,
                 guards: Guards | None = None, heads_ratio: float = 0.0, head_dims: bool = True,
                 max_ratio: float = 1.0, reference: dict[str, tuple[int, int]] | None = None):
        self.model = model
        self.guards = guards or Guards()
        # whole heads of nn.MultiheadAttention: replaced first by the split-projection equivalent
        self.converted = (attention.split_multihead_attention(model) if heads_ratio > 0 else [])
        first, self.output_name = io_layers(model, example)
        modules = dict(model.named_modules())
        self.first_conv = modules.get(first) if first and self.guards.first_conv_max_ratio is not None else None
        self.first_conv_name = first
        patterns = list(ignore or [])
        if self.guards.classifier and self.output_name:
            patterns.append(self.output_name)
        self.sites = attention.find_attention(model)
        if heads_ratio > 0 and not any(s.kind == "qkv" for s in self.sites):
            where = ", ".join(s.name for s in self.sites) or "none found"
            raise InputError("whole-head pruning needs attention with separate q/k/v projections or "
                             f"nn.MultiheadAttention (attention modules: {where})", field="heads.ratio")
        if scope == "per_layer":
            names = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
            for pat in per_layer or {}:
                if not any(match_any(n, [pat]) for n in names):
                    raise InputError(f"pattern {pat!r} matches no Conv/Linear module (e.g. {names[:3]})",
                                     field="ratios")
        module_ratios = None
        if heads_ratio > 0 and ratio == 0 and scope != "per_layer":
            # Torch-Pruning only visits a scope that loses channels; give each attention its own
            # scope with a token ratio, and cut no dims, so that only whole heads go.
            head_dims = False
            module_ratios = {s.qkv[0]: 1e-6 for s in self.sites if s.kind == "qkv"}
        self.example = example
        self.timing: dict[str, float] = {}
        self.patched: list[dict] = []   # attributes forward reads that followed a pruned width
        self.skipped: list[dict] = []   # groups left unpruned, with the reason
        self.split_coupled: dict[str, int] = {}  # layers cut alike in each of n equal split parts
        self._contested: dict = {}  # attributes two groups would patch differently (see step)
        t0 = time.perf_counter()
        self.expected_shape = _output_shape(model, example)
        self._names = {m: n for n, m in model.named_modules()}

        def new_pruner():
            p = build_pruner(model, example, importance, ratio=ratio, scope=scope, steps=steps,
                             round_to=None, ignore=patterns, per_layer=per_layer, max_ratio=max_ratio,
                             module_ratios=module_ratios, output_transform=logits_of,
                             **attention.pruner_kwargs(self.sites, heads_ratio, head_dims))
            for mod, name in self._names.items():  # guards relative to the unpruned model
                if reference and name in reference:
                    tp_compat.set_initial_channels(p, mod, *reference[name])
            self._harden(p)
            for mod, parts in tp_extensions.equal_split_producers(p.DG).items():
                if mod not in p.out_channel_groups:  # a layer's own grouping (heads) stays
                    p.out_channel_groups[mod] = parts
                    if parts > 1:
                        self.split_coupled[self._names.get(mod, "?")] = parts
            return p

        self._new_pruner = new_pruner
        self._patterns = patterns
        self._reference = reference or {}
        self.pruner = new_pruner()
        self._tick("graph", t0)
        self.bound: list[dict] = []
        if self.guards.classifier and self.output_name:
            self.bound.append({"guard": "classifier", "group": self.output_name, "detail": "outputs kept"})

    def step(self) -> list[dict]:
        """One pruning step; returns the guard bindings of this step.

        Fast path: cut every group Torch-Pruning proposes, then run the model once. When it no
        longer runs, everything is rolled back and the step is redone group by group: each cut is
        followed by a forward; a failing one gets the integer attributes forward reads patched
        (``hidden_dim``, ``head_dim``, split sizes: see :meth:`_patch_constants`) and, if it
        still fails, is undone and reported in :attr:`skipped`. A step never leaves a model that
        does not run and never raises for a group Torch-Pruning mis-handles."""
        start = len(self.bound)
        t0 = time.perf_counter()
        snap = tp_extensions.Snapshot(self.model)
        state = tp_compat.pruner_state(self.pruner)
        self._tick("snapshot", t0)
        skipped_before = len(self.skipped)
        heads = [s.heads for s in self.sites]
        self._cut_failed = None
        pending = self._run_groups(careful=False)
        self._contested = self._contested_attributes(pending)
        ok = self._cut_failed is None and self._runs(attention_patch=True)[0]
        if not ok and self._cut_failed is None and any(pending):
            t0 = time.perf_counter()
            patches = self._apply_patches(pending)
            self._tick("patch", t0)
            ok, _ = self._runs()
            if ok:
                self.patched += patches
        if not ok and self._cut_failed is None and self._output_moved():
            # the model runs but its output changed shape: the output layer itself was cut (the
            # classifier guard is off); that is the recipe's doing, refused as before, not undone
            check_model_runs(self.model, self.example, self.expected_shape, self.output_name,
                             when=f"after pruning step {self.pruner.current_step}")
        if not ok:
            t0 = time.perf_counter()
            snap.restore()
            for site, h in zip(self.sites, heads):
                site.heads = h
            del self.bound[start:], self.skipped[skipped_before:]
            self.pruner = self._new_pruner()
            tp_compat.set_pruner_state(self.pruner, state)
            self._tick("graph", t0)
            self.timing["careful_mode"] = 1.0
            self._run_groups(careful=True)
        return self.bound[start:]

    def whole_layers(self) -> list[dict]:
        """Conv/Linear layers that still have every output channel while the model lost channels
        elsewhere, one entry per coupled group, with the cause. Torch-Pruning drops such groups
        without a word (a group whose indices overrun a coupled tensor fails its
        ``check_pruning_group``; a group holding an ignored layer is never offered), and a layer
        whose weight forward uses through a functional call (torchvision's Swin applies ``qkv`` and
        ``proj`` with ``F.linear``) is outside the traced graph, so no group includes it. Layers the
        user or the guards keep (``ignore``, the classifier guard) and groups already reported are
        not repeated."""
        DG = self.pruner.DG
        names = self._names
        param_names = {id(p): n for n, p in self.model.named_parameters()}
        reported = {e.get("group") for e in self.skipped} | {b.get("group") for b in self.bound}
        kept = set(self.pruner.ignored_layers) | set(getattr(DG, "IGNORED_LAYERS_IN_TRACING", []))
        visited: set = set()
        out: list[dict] = []
        cut_somewhere = any(out_width(m) < self._reference[n][0] for m, n in names.items()
                            if isinstance(m, _WEIGHTED) and n in self._reference)
        if not cut_somewhere:
            return out  # nothing was cut: the stage's no-op message says why
        for mod, name in names.items():
            if (not isinstance(mod, _WEIGHTED) or mod in visited or name in reported
                    or match_any(name, self._patterns)):
                continue
            if mod not in DG.module2node:
                out.append({"group": name, "reason": "outside the traced graph: forward uses its weight through a "
                            "functional call (F.linear/F.conv), so no channel group includes it"})
                continue
            if name not in self._reference or out_width(mod) < self._reference[name][0]:
                continue
            fn = DG.get_pruner_of_module(mod)
            if fn is None:
                continue
            try:
                group = DG.get_pruning_group(mod, fn.prune_out_channels, list(range(out_width(mod))))
            except Exception as exc:  # the guarded walk records failures itself; say it here too
                out.append({"group": name, "reason": f"its group cannot be built ({_one_line(exc)})"})
                continue
            members = [dep.target.module for dep, _ in group if DG.is_out_channel_pruning_fn(dep.handler)]
            layers = [names[m] for m in members if isinstance(m, _WEIGHTED) and m in names]
            visited.update(members)
            if any(n in reported for n in layers):
                continue
            blockers = [names.get(m, "?") for m in members if m in kept]
            overrun = []
            for dep, idxs in group:
                t = dep.target.module
                handler = DG.get_pruner_of_module(t) if isinstance(t, nn.Parameter) else None
                size = handler.get_out_channels(t) if handler is not None else None
                if size is not None and idxs and max(idxs) >= size:  # along the dim Torch-Pruning cuts
                    overrun.append(f"{param_names.get(id(t), 'a parameter')} {tuple(t.shape)}")
            if blockers:
                reason = (f"coupled to {', '.join(blockers[:3])}, which is kept whole (ignore pattern or "
                          "classifier guard)")
            elif overrun or not DG.check_pruning_group(group):
                what = ", ".join(overrun[:3]) or "a coupled tensor"
                reason = (f"its channel indices reach {what}, which has fewer channels than the group "
                          "(Torch-Pruning refuses the group)")
            else:
                reason = "the ranking kept every channel of its group"
            out.append({"group": name, "layers": layers, "reason": reason})
        return out

    def _tick(self, phase: str, t0: float) -> None:
        self.timing[phase] = self.timing.get(phase, 0.0) + time.perf_counter() - t0

    def _note_skip(self, module, reason: str) -> None:
        name = self._names.get(module, None) if isinstance(module, nn.Module) else None
        entry = {"group": name or "<graph op>", "reason": reason}
        if entry not in self.skipped:
            self.skipped.append(entry)

    def _harden(self, p) -> None:
        """Make the pruner skip (and report) a group whose dependency bookkeeping fails instead of
        raising out of the whole step (Torch-Pruning's generator cannot resume after an error)."""
        estimate = p.estimate_importance

        def safe_importance(group):
            if len(group) == 0:
                return None
            try:
                imp = estimate(group)
            except Exception as exc:  # indices out of range in a coupled layer: mis-mapped split/concat
                self._note_skip(group[0].dep.target.module,
                                f"channel indices do not line up across the group ({_one_line(exc)})")
                return None
            if imp is not None and len(imp) % max(1, tp_compat.channel_groups(p, group)):
                self._note_skip(group[0].dep.target.module, "channel count does not split into its groups")
                return None
            return imp

        p.estimate_importance = safe_importance

    def _run_groups(self, careful: bool) -> list[list[tuple]]:
        """Cut what the pruner proposes. Fast path (``careful`` False): no checks; returns, per
        group, the constant patches it would need. Careful: each group is a transaction."""
        before_prune = getattr(self.pruner.importance, "before_prune", None)
        groups = self.pruner.step(interactive=True)
        DG = self.pruner.DG
        pending: list[list[tuple]] = []
        splits = tp_extensions.split_sizes(DG) if not careful else {}
        while True:
            t0 = time.perf_counter()
            try:
                group = next(groups)
                group = self._apply_guards(group) if len(group) else None
            except StopIteration:
                self._tick("rank", t0)
                break
            except Exception as exc:  # Torch-Pruning's generator died: what was cut so far stays (and is checked)
                self._tick("rank", t0)
                self.skipped.append({"group": "<remaining groups>", "reason": f"ranking stopped: {_one_line(exc)}"})
                break
            self._tick("rank", t0)
            if group is None or len(group) == 0:
                continue
            root = group[0].dep.target.module
            if not careful:
                t0 = time.perf_counter()
                widths = tp_extensions.width_changes(DG, group)
                cg = max(1, tp_compat.channel_groups(self.pruner, group))
                if before_prune is not None:
                    before_prune(group)
                try:
                    group.prune()
                except Exception as exc:  # Torch-Pruning's own cut fails (a concat of unknown sizes):
                    self._cut_failed = _one_line(exc)  # the step is redone group by group
                    self._tick("cut", t0)
                    break
                after = tp_extensions.split_sizes(DG)
                cands, _ = self._constant_candidates(group, widths, splits, after, cg)
                pending.append([(*c, self._names.get(root, "?")) for c in cands])
                splits = after
                self._tick("cut", t0)
                continue
            t0 = time.perf_counter()
            snap = tp_extensions.Snapshot(self.model, DG)
            heads = [s.heads for s in self.sites]
            data = ({p: p.data.clone() for dep, _ in group if isinstance(dep.target.module, nn.Module)
                     for p in dep.target.module.parameters(recurse=False)} if before_prune is not None else {})
            widths = tp_extensions.width_changes(DG, group)
            splits = tp_extensions.split_sizes(DG)
            cg = max(1, tp_compat.channel_groups(self.pruner, group))
            self._tick("snapshot", t0)
            t0 = time.perf_counter()
            try:
                if before_prune is not None:
                    before_prune(group)
                group.prune()
                err = None
            except Exception as exc:
                err = f"cutting it fails ({_one_line(exc)})"
            self._tick("cut", t0)
            if err is None:
                ok, err = self._runs()
                if not ok:
                    t0 = time.perf_counter()
                    cands, why = self._constant_candidates(group, widths, splits, tp_extensions.split_sizes(DG), cg)
                    contested = [c for c in cands if (c[0], c[1]) in self._contested]
                    cands = [c for c in cands if (c[0], c[1]) not in self._contested]
                    patches = self._apply_patches([cands])
                    self._tick("patch", t0)
                    if contested and not (patches and self._runs()[0]):
                        resolved = self._resolve_contested(contested, snap)
                        if resolved is not None:
                            self.patched += patches + resolved
                            continue
                    if patches:
                        ok, err2 = self._runs()
                        if ok:
                            self.patched += patches
                            continue
                        err = (f"{err}; with {', '.join(p['module'] + '.' + p['attribute'] for p in patches)} "
                               f"patched: {err2}")
                    elif why:
                        err = f"{err}; {why}"
                else:
                    continue
            snap.restore()
            for site, h in zip(self.sites, heads):
                site.heads = h
            for p, d in data.items():
                p.data = d
            self._note_skip(root, f"the model no longer runs when it is cut: {err}")
        for module, reason in DG.__dict__.get("group_failures", []):
            self._note_skip(module, f"dependency graph cannot map its channels ({reason})")
        return pending

    def _output_moved(self) -> bool:
        try:
            return _output_shape(self.model, self.example) != self.expected_shape
        except Exception:  # it does not run at all: not a moved output
            return False

    def _runs(self, attention_patch: bool = True) -> tuple[bool, str | None]:
        """Whether the model still runs at the example and keeps its output shape (the message names
        the failing module, found by a second, hooked forward only when it fails). First the
        attention modules get their head count/width written back."""
        if attention_patch and self.sites:
            try:
                attention.patch_attention(self.sites, self.pruner.num_heads)
                attention.patch_config(self.model, self.sites)
            except ModelBreakError as exc:
                return False, str(exc)
        t0 = time.perf_counter()
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = call_model(self.model, self.example)
            got = tuple(logits_of(out).shape)
            ok, err = got == self.expected_shape, f"output shape {self.expected_shape} -> {got}"
        except Exception:
            _, where, exc = _executing_module_error(self.model, self.example)
            ok, err = False, f"module {where or '<top level>'!r}: {_one_line(exc)}" if exc else "fails"
        finally:
            self.model.train(was)
            self._tick("checks", t0)
        return ok, (None if ok else err)

    @staticmethod
    def _contested_attributes(pending: list[list[tuple]]) -> dict[tuple[str, str], tuple[Any, dict]]:
        """Attributes that groups of the same old width would patch to different new widths:
        ``(module, attribute) -> (old value, {new value: group root})``. Which pruned width such an
        attribute follows cannot be told from its value."""
        claims: dict[tuple[str, str], dict] = {}
        olds: dict[tuple[str, str], Any] = {}
        for cands in pending:
            for owner, attr, old, new, root in cands:
                key = (owner, attr)
                claims.setdefault(key, {}).setdefault(_patch_value(new), root)
                olds[key] = old
        return {k: (olds[k], v) for k, v in claims.items() if len(v) > 1}

    def _resolve_contested(self, contested: list[tuple], snap: "tp_extensions.Snapshot") -> list[dict] | None:
        """A contested attribute (two groups of its old width are cut to different widths) that
        forward needs patched after this group's cut. When the model runs with this group's value
        and with none of the other groups' values, the attribute follows this group: it is patched
        and reported (Res2Net's ``width``, read by ``torch.split`` of the layer this group cuts,
        while the branch convs of the same old width are cut differently). When forward does not
        need it, None. When another group's value runs too, which width it follows cannot be told:
        refuse (the group is rolled back first, the model still runs)."""
        modules = dict(self.model.named_modules())
        saved = {(o, a): getattr(modules[o], a) for o, a, *_ in contested}

        def revert():
            for (o, a), v in saved.items():
                setattr(modules[o], a, v)

        patches = self._apply_patches([contested])
        needed, _ = self._runs()
        if not needed:
            revert()
            return None
        others_run = []
        for owner, attr, old, new, *_ in contested:
            mine = getattr(modules[owner], attr)
            for value in self._contested[(owner, attr)][1]:
                if value == _patch_value(new):
                    continue
                setattr(modules[owner], attr, type(old)(value) if isinstance(old, (list, tuple)) else value)
                if self._runs()[0]:
                    others_run.append(value)
                setattr(modules[owner], attr, mine)
        if not others_run:
            for patch in patches:
                patch["resolved"] = "forward runs with this group's width and with no other group's"
            return patches
        revert()
        snap.restore()
        owner, attr = contested[0][0], contested[0][1]
        old, claims = self._contested[(owner, attr)]
        cuts = ", ".join(f"{root} -> {new}" for new, root in sorted(claims.items(), key=lambda kv: str(kv[1])))
        raise ModelBreakError(f"module {owner or '<model>'!r} attribute {attr!r} = {old} must follow a pruned width "
                              f"for forward to run, but groups of width {old} are cut to different widths ({cuts}) "
                              f"and forward runs with more than one of them: cannot tell which one it follows; "
                              f"list one of those layers in 'ignore'")

    def _constant_candidates(self, group, widths: dict[int, set[int]], splits_before: dict, splits_after: dict,
                             cg: int) -> tuple[list[tuple], str | None]:
        """Integer attributes forward may read that follow a width this group cuts.

        Candidates are the plain attributes (not a torch layer's own fields, which Torch-Pruning
        updates) of the modules that contain a cut layer, the model itself included: an int equal
        to a cut width's old value (``hidden_dim``, ``embed_dim``, ``dim``) or to its old per-head/
        per-group value (``head_dim``), and a list/tuple of ints equal to a split op's old part
        sizes (timm ``MixedConv2d.splits``). Returns ((module name, attribute, old, new), ...) and,
        when there is none, why."""
        ambiguous = sorted(old for old, news in widths.items() if len(news) > 1)
        pairs = {old: next(iter(news)) for old, news in widths.items() if len(news) == 1}
        if cg > 1:
            for old, new in list(pairs.items()):
                if old % cg == 0 and new % cg == 0:
                    pairs.setdefault(old // cg, new // cg)
        split_map = {tuple(before): splits_after[op] for op, before in splits_before.items()
                     if op in splits_after and splits_after[op] != before}
        owners = {""}
        for dep, _ in group:
            name = self._names.get(dep.target.module) if isinstance(dep.target.module, nn.Module) else None
            if name:
                parts = name.split(".")
                owners.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        modules = dict(self.model.named_modules())
        out = []
        for owner in sorted(owners):
            m = modules.get(owner)
            if m is None or type(m).__module__.startswith("torch.nn"):
                continue
            for attr, v in vars(m).items():
                if attr.startswith("_") or isinstance(v, bool):
                    continue
                if isinstance(v, int) and v in pairs:
                    out.append((owner, attr, v, pairs[v]))
                elif (isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                      and tuple(v) in split_map):
                    out.append((owner, attr, v, type(v)(split_map[tuple(v)])))
        if out:
            return out, None
        if ambiguous:
            return [], (f"width {ambiguous[0]} shrinks to different sizes within the group, so no attribute "
                        "holding it can be patched unambiguously")
        return [], "no attribute of the enclosing modules holds the old width"

    def _apply_patches(self, per_group: list[list[tuple]]) -> list[dict]:
        """Set every candidate attribute whose groups agree on its new value; an attribute two
        groups would set differently is ambiguous and left as it is (the check then refuses)."""
        wanted: dict[tuple[str, str], set] = {}
        olds = {}
        for cands in per_group:
            for owner, attr, old, new, *_ in cands:
                wanted.setdefault((owner, attr), set()).add(_patch_value(new))
                olds[(owner, attr)] = old
        modules = dict(self.model.named_modules())
        patches = []
        for (owner, attr), news in wanted.items():
            if len(news) != 1:
                continue
            new = next(iter(news))
            old = olds[(owner, attr)]
            new = type(old)(new) if isinstance(old, (list, tuple)) else new
            setattr(modules[owner], attr, new)
            patches.append({"module": owner or "<model>", "attribute": attr,
                            "old": list(old) if isinstance(old, tuple) else old,
                            "new": list(new) if isinstance(new, tuple) else new})
        return patches

    def _apply_guards(self, group):
        g, DG = self.guards, self.pruner.DG
        dep0, idxs = group[0].dep, list(group[0].idxs)
        module, handler = dep0.target.module, dep0.handler
        is_out = DG.is_out_channel_pruning_fn(handler)
        current = DG.get_out_channels(module) if is_out else DG.get_in_channels(module)
        if not current or not idxs:
            return group
        init = tp_compat.initial_channels(self.pruner, module, is_out, current)
        is_attn, qkv = tp_compat.attention_group(self.pruner, group)
        if is_attn:
            return self._guard_attention(group, module, handler, idxs, current, init, qkv)
        cg = max(1, tp_compat.channel_groups(self.pruner, group))
        size = current // cg
        local = sorted({int(i) % size for i in idxs})
        keep = size - len(local)
        target, reasons = keep, []
        floor = math.ceil(g.floor(init) / cg)
        if floor > target:
            target, reasons = floor, reasons + [f"min_channels {g.floor(init)}"]
        if self.first_conv is not None and any(d.target.module is self.first_conv and DG.is_out_channel_pruning_fn(d.handler)
                                               for d, _ in group):
            base = tp_compat.initial_channels(self.pruner, self.first_conv, True, current)
            f = math.ceil(base * (1 - g.first_conv_max_ratio) / cg)
            if f > target:
                target, reasons = f, reasons + [f"first_conv_max_ratio {g.first_conv_max_ratio}"]
        if g.round_to:
            unit = g.round_to // math.gcd(g.round_to, cg)
            r = min(size, math.ceil(target / unit) * unit)
            if r > target:
                target, reasons = r, reasons + [f"round_to {g.round_to}"]
        if target <= keep:
            return group
        n = size - target
        self._record(module, reasons, current, keep * cg, target * cg)
        if n <= 0:
            return None
        chosen = self._weakest(module, handler, current, cg, local, n)
        new = sorted(j + c * size for c in range(cg) for j in chosen)
        return DG.get_pruning_group(module, handler, new)

    def _record(self, module, reasons: list[str], channels: int, proposed: int, kept: int) -> None:
        self.bound.append({"guard": reasons[-1].split()[0], "group": self._names.get(module, "?"),
                           "channels": channels, "proposed_keep": proposed, "kept": kept,
                           "detail": "; ".join(reasons)})

    def _weakest(self, module, handler, current: int, copies: int, candidates: list[int], n: int) -> list[int]:
        """The ``n`` candidates (indices within one of ``copies`` equal slices) the criterion scores
        lowest, scoring the whole group so every channel is ranked on the same footing."""
        DG = self.pruner.DG
        imp = self.pruner.estimate_importance(DG.get_pruning_group(module, handler, list(range(current))))
        if imp is None or len(imp) != current:
            return candidates[:n]
        per_local = imp.view(copies, current // copies).mean(0) if copies > 1 else imp
        return sorted(candidates, key=lambda j: float(per_local[j]))[:n]

    def _guard_attention(self, group, module, handler, idxs, current: int, init: int, qkv):
        """Attention groups lose whole heads and/or the same dims in every surviving head; the
        guards apply to the head width (min_channels over all heads, round_to per head)."""
        g = self.guards
        site = next((s for s in self.sites if s.kind == "qkv" and s.qkv[0] in qkv), None)
        if site is None or current != site.heads * site.head_dim:
            return group
        hd, heads = site.head_dim, site.heads
        cut = {int(i) for i in idxs}
        alive = [h for h in range(heads) if not all(h * hd + d in cut for d in range(hd))]
        dead = [h for h in range(heads) if h not in alive]
        if not alive:
            raise ModelBreakError(f"pruning would remove every head of {site.name}")
        dims = sorted({i % hd for i in cut if i // hd in alive})
        keep = hd - len(dims)
        target, reasons = keep, []
        floor = math.ceil(g.floor(init) / len(alive))
        if floor > target:
            target, reasons = min(hd, floor), [f"min_channels {g.floor(init)}"]
        if g.round_to:  # per head: the head width is what the attention matmuls see
            r = min(hd, math.ceil(target / g.round_to) * g.round_to)
            if r > target:
                target, reasons = r, reasons + [f"round_to {g.round_to}"]
        if target <= keep:
            return group
        self._record(module, reasons, current, keep * len(alive), target * len(alive))
        chosen = self._weakest(module, handler, current, heads, dims, hd - target)
        new = sorted([h * hd + d for h in dead for d in range(hd)] + [h * hd + d for h in alive for d in chosen])
        return self.pruner.DG.get_pruning_group(module, handler, new) if new else None


def ratio_for_target(model: nn.Module, example: torch.Tensor, build: Callable[[], Any],
                     measure: Callable[[nn.Module], float], goal: float, *, iters: int = 10, hi: float = 0.95,
                     steps: int = 1, prepare_step: Callable[[nn.Module, Any], None] | None = None,
                     **pruner_kw) -> tuple[float, list[dict]]:
    """Bisection on the pruning ratio for a kept fraction (MACs or params) at or just below ``goal``.

    Each trial prunes a deep copy in ``steps`` steps with a fresh ``build()`` importance;
    ``prepare_step(copy, importance)`` runs before each step (calibration for data-aware criteria;
    no fine-tune between trial steps, so a recipe with ``finetune_between`` may land slightly off).
    ``measure(copy)`` is the kept fraction. Returns the smallest ratio found that reaches the goal
    and every trial."""
    trials: list[dict] = []

    def trial(r: float) -> float:
        m = copy.deepcopy(model)
        imp = build()
        gp = GuardedPruner(m, example, imp, ratio=r, steps=steps, **pruner_kw)
        for _ in range(steps):
            if prepare_step is not None:
                prepare_step(m, imp)
            gp.step()
            m.zero_grad(set_to_none=True)
        kept = float(measure(m))
        trials.append({"ratio": r, "kept": kept})
        return kept

    if trial(hi) > goal:
        raise InputError(f"cannot reach {goal:g} kept: ratio {hi} keeps {trials[-1]['kept']:.4f} "
                         "(the guards or max_ratio stop it; relax them or ask for less)", field="target")
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if trial(mid) <= goal:
            hi = mid
        else:
            lo = mid
    return hi, trials


def annotate_guards(groups: list[dict], model: nn.Module, example: torch.Tensor, **pruner_kw) -> list[dict]:
    """Add to each ``describe_groups`` entry the guard that binds on it, found by pruning a copy
    one-shot with the recipe's settings and an L2 criterion (inspect has no data)."""
    m = copy.deepcopy(model)
    gp = GuardedPruner(m, example, tp.importance.GroupMagnitudeImportance(p=2), **pruner_kw)
    gp.step()
    by_root: dict[str, list[str]] = {}
    for b in gp.bound:
        by_root.setdefault(b["group"], []).append(b["detail"])
    names = {m: n for n, m in model.named_modules()}
    heads = {f"{names[s.qkv[0]]}.out": s for s in attention.find_attention(model) if s.kind == "qkv"}
    for grp in groups:
        site = next((heads[k] for k in grp["members"] if k in heads), None)
        if site is not None:
            grp["attention"] = {"module": site.name, "heads": site.heads, "head_dim": site.head_dim}
        binds = list(by_root.get(grp["root"], []))
        if gp.output_name and f"{gp.output_name}.in" in grp["members"] and gp.guards.classifier:
            binds.append(f"classifier {gp.output_name} keeps its outputs")
        grp["guards"] = binds
    return groups

