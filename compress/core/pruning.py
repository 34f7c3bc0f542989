"""Structured (channel) pruning on Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023).

Coupled layers (a residual addition, a concat, a depthwise conv, a BN after a conv) form one
*group* that loses the same channel indices together, so the pruned model stays valid. Criteria
live in the ``IMPORTANCES`` registry; data-aware ones need calibration batches.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from ..registry import Registry
from .metrics import logits_of


@dataclass(frozen=True)
class Criterion:
    """A pruning criterion: how to build the Torch-Pruning importance, and whether it needs data.

    ``needs`` is ``None`` (data-free), ``"grad"`` (accumulate dL/dw over calibration batches before
    scoring) or ``"hessian"`` (per-sample gradient accumulation for the diagonal Hessian / Fisher)."""

    build: Callable[..., tp.importance.Importance]
    needs: str | None = None
    doc: str = ""
    # Optional custom calibration: (importance, model, batches, device) -> None. Used instead of
    # accumulate_gradients for criteria that need activations/curvature (kfac, obs).
    calibrate: Callable[..., None] | None = None


IMPORTANCES: Registry[Criterion] = Registry("importance")


def match_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def output_layer(model: nn.Module) -> str | None:
    """Name of the last Linear (the classifier), which is never pruned by default."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    return last


def ignored_modules(model: nn.Module, patterns: Iterable[str] | None) -> list[nn.Module]:
    pats = list(patterns) if patterns is not None else []
    if not pats:
        out = output_layer(model)
        pats = [out] if out else []
    return [m for n, m in model.named_modules() if n and match_any(n, pats)]


def calibrate(criterion: Criterion, importance, model: nn.Module, batches, device) -> None:
    """Prepare a data-aware criterion on calibration batches (no-op for data-free ones)."""
    if criterion.calibrate is not None:
        criterion.calibrate(importance, model, batches, device)
    elif criterion.needs:
        accumulate_gradients(model, batches, device, criterion.needs, importance)


def accumulate_gradients(model: nn.Module, batches, device, needs: str, imp=None) -> None:
    """Run calibration batches forward/backward so data-aware criteria can read ``.grad``."""
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()  # BN statistics must not move while we score
    if needs == "hessian" and imp is not None and hasattr(imp, "zero_grad"):
        imp.zero_grad()  # once: the estimate is the mean over every calibration sample
    for xb, yb in batches:
        xb, yb = xb.to(device), yb.to(device)
        if needs == "hessian" and imp is not None and hasattr(imp, "accumulate_grad"):
            for i in range(len(xb)):  # per-sample squared gradients for the diagonal estimate
                model.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(logits_of(model(xb[i: i + 1])), yb[i: i + 1])
                loss.backward()
                imp.accumulate_grad(model)
        else:
            loss = nn.functional.cross_entropy(logits_of(model(xb)), yb)
            loss.backward()
    model.train(was)


def build_pruner(model: nn.Module, example_inputs: torch.Tensor, importance: tp.importance.Importance, *,
                 ratio: float, scope: str, steps: int = 1, round_to: int | None = None,
                 ignore: Iterable[str] | None = None, per_layer: dict[str, float] | None = None,
                 max_ratio: float = 1.0, **extra) -> tp.pruner.BasePruner:
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


from . import criteria  # noqa: E402,F401  (registers every criterion into IMPORTANCES)
