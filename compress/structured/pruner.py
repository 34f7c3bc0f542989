"""Structured (channel) pruning on Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023).

Coupled layers (a residual addition, a concat, a depthwise conv, a BN after a conv) form one
*group* that loses the same channel indices together, so the pruned model stays valid. Criteria
live in :mod:`compress.structured.criteria`; Torch-Pruning internals are reached only through
:mod:`compress.structured.tp_compat`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from ..errors import InputError, ModelBreakError
from ..metrics import logits_of
from ..modules import match_any, output_layer
from . import attention, tp_compat


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


def describe_groups(model: nn.Module, example_inputs: torch.Tensor, ignore: Iterable[str] | None = None) -> list[dict]:
    """The prunable channel groups: which layers lose channels together, and how many channels."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    ignored = set()
    for m in ignored_modules(model, ignore):
        ignored.update(m.modules())
    name_of = {m: n for n, m in model.named_modules()}
    groups = []
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
        groups.append({"root": name_of.get(root, "?"), "channels": int(channels or 0), "members": members})
    return groups


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
        model(example)
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
            return model(example), None, None
    except Exception as exc:  # any shape error inside a module
        return None, (stack[-1] if stack else None), exc
    finally:
        for h in handles:
            h.remove()


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
            raise InputError("whole-head pruning needs attention with separate q/k/v projections "
                             f"(attention modules: {where}); nn.MultiheadAttention packs q/k/v at the "
                             "residual width, so only channels inside its heads can be pruned", field="heads.ratio")
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
        self.pruner = build_pruner(model, example, importance, ratio=ratio, scope=scope, steps=steps,
                                   round_to=None, ignore=patterns, per_layer=per_layer, max_ratio=max_ratio,
                                   module_ratios=module_ratios, output_transform=logits_of,
                                   **attention.pruner_kwargs(self.sites, heads_ratio, head_dims))
        self._names = {m: n for n, m in model.named_modules()}
        for mod, name in self._names.items():  # guards relative to the unpruned model
            if reference and name in reference:
                tp_compat.set_initial_channels(self.pruner, mod, *reference[name])
        self.bound: list[dict] = []
        if self.guards.classifier and self.output_name:
            self.bound.append({"guard": "classifier", "group": self.output_name, "detail": "outputs kept"})

    def step(self) -> list[dict]:
        """One pruning step; returns the guard bindings of this step."""
        start = len(self.bound)
        # criteria may edit weights just before a group is cut (the OBS update of the survivors)
        before_prune = getattr(self.pruner.importance, "before_prune", None)
        for group in self.pruner.step(interactive=True):
            group = self._apply_guards(group)
            if group is not None:
                if before_prune is not None:
                    before_prune(group)
                group.prune()
        attention.patch_attention(self.sites, self.pruner.num_heads)
        attention.patch_config(self.model, self.sites)
        return self.bound[start:]

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

