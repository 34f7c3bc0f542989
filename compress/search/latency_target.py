"""Prune a model to a measured latency budget: the per-layer latency table on the target backend,
the allocator (:mod:`compress.search.allocator`), and end-to-end enforcement (interleaved with the
dense model). Used by the ``prune`` stage (``target: {latency: 0.5}``) and seeds the ``search``."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..modules import device_of
from ..structured import pruner as structured
from .allocator import (
    ChannelGroup,
    FitResult,
    LayerLatency,
    channel_groups,
    corrected,
    fit_to_budget,
    group_factors,
    layer_latency,
    ratios_for,
)
from .candidates import measure_models
from .latency_table import LatencyPredictor, LatencyTable
from .sensitivity import calibration_loss, measured_groups


@dataclass
class LatencySetup:
    """Where latency is measured and how strictly it is enforced."""

    backend: str = "onnxruntime"
    batch_size: int = 1
    threads: int = 1
    tolerance: float = 0.05
    refits: int = 3
    grid_points: int = 8          # per layer side: every width round_to allows when at most this many
    grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    lookahead: int = 4
    refit_groups: bool = False    # per-group re-fit of the table before allocating (allocator.group_factors)
    warmup: int = 5
    iters: int = 60
    rounds: int = 6


@dataclass
class LatencyFit:
    result: FitResult
    groups: list[ChannelGroup]
    latency: LayerLatency
    predictor: LatencyPredictor
    table: LatencyTable
    per_layer: dict[str, float]   # the chosen widths as a ``per_layer`` ratios block (paste to rebuild)
    sensitivity: dict | None = None  # cost ``sensitivity``: the measured loss increase per group and width
    group_refit: dict | None = None  # refit_groups: per group, the table's and the measured saving and the factor

    def summary(self) -> dict:
        r = self.result
        last = r.last
        return {
            "budget": r.budget, "tolerance": r.tolerance, "within_budget": r.within,
            "measured_ratio": last.measured_ratio, "predicted_ratio": last.predicted_ratio,
            "dense_ms": last.dense_ms, "model_ms": last.model_ms,
            "widths": {g.name: w for g, w in zip(self.groups, last.widths)},
            "dense_widths": {g.name: g.dense for g in self.groups},
            "attempts": [{"target_ratio": a.target_ratio, "predicted_ratio": a.predicted_ratio,
                          "measured_ratio": a.measured_ratio, "dense_ms": a.dense_ms, "model_ms": a.model_ms}
                         for a in r.attempts],
            "table": {"key": self.table.key, "entries": len(self.table.layers), "measured_now": self.table.measured},
            "per_layer": self.per_layer,
            # groups cut to the narrowest width the guards allow (min_channels, first conv, max_ratio, round_to)
            "at_guard_floor": [g.name for g, w in zip(self.groups, last.widths) if w == g.widths[-1] < g.dense],
            **({"sensitivity": self.sensitivity} if self.sensitivity is not None else {}),
            **({"group_refit": self.group_refit} if self.group_refit is not None else {}),
        }


def per_layer_block(model: nn.Module, groups: Iterable[ChannelGroup], ratios: Iterable[float]) -> dict[str, float]:
    """Group ratios as module-name -> ratio for every out-side Conv/Linear of each group (Torch-Pruning
    reads a group's ratio from whichever member it meets first)."""
    mods = dict(model.named_modules())
    out: dict[str, float] = {}
    for g, r in zip(groups, ratios):
        if r <= 0:
            continue
        for m in g.members:
            if m.endswith(".out") and isinstance(mods.get(m[:-4]), (nn.Conv2d, nn.Linear)):
                out[m[:-4]] = float(r)
    return out


def fit_latency(model: nn.Module, input_shape, example: torch.Tensor, build_importance: Callable[[], object],
                calibrate: Callable[[nn.Module, object], None], *, budget: float, setup: LatencySetup,
                guards: structured.Guards, ignore: list[str] | None, max_ratio: float, table_path: Path,
                work_dir: Path, reference: dict | None = None, log: Callable[[str], None] = lambda s: None,
                cost: str = "importance", batches: Sequence = (), loss: Callable | None = None,
                sensitivity_points: int = 3) -> LatencyFit:
    """Allocate channels for ``budget`` x dense latency on ``setup.backend``, prune a copy of ``model`` with
    the guarded pruner, measure it interleaved with ``model``, re-fit while it misses. ``model`` is left as is.

    ``cost``: ``importance`` (the criterion's scores, :func:`compress.search.allocator.removal_costs`) or
    ``sensitivity`` (each group narrowed alone to ``sensitivity_points`` widths, the task's ``loss`` on
    ``batches`` after BatchNorm re-estimation, :mod:`compress.search.sensitivity`)."""
    model = model.eval()
    first, output = structured.io_layers(model, example)
    patterns = list(ignore or []) + ([output] if guards.classifier and output else [])
    imp = build_importance()
    calibrate(model, imp)
    groups = channel_groups(model, example, imp, patterns, round_to=guards.round_to, min_floor=guards.floor,
                            first_conv=first, first_conv_max_ratio=guards.first_conv_max_ratio,
                            max_ratio=max_ratio)
    model.zero_grad(set_to_none=True)
    prunable = {m for g in groups for m in g.members}
    table = LatencyTable(table_path, setup.backend, setup.batch_size, setup.threads)
    predictor = LatencyPredictor(model, input_shape, table, prunable, setup.grid, guards.round_to, setup.grid_points)
    measured_before = table.measured
    predictor.warm(model)
    log(f"  latency table ({setup.backend}, batch {setup.batch_size}): {len(table.layers)} entries, "
        f"{table.measured - measured_before} measured now")
    kw = {"scope": "per_layer", "ignore": ignore, "guards": guards, "max_ratio": 1.0,
          "reference": reference or structured.channel_counts(model, example)}

    def apply(widths: list[int]) -> nn.Module:
        m = copy.deepcopy(model)
        block = per_layer_block(m, groups, ratios_for(groups, widths))
        if not block:
            return m
        imp2 = build_importance()
        gp = structured.GuardedPruner(m, example, imp2, ratio=0.0, per_layer=block, **kw)
        calibrate(m, imp2)
        gp.step()
        m.zero_grad(set_to_none=True)
        return m.eval()

    sensitivity = None
    if cost == "sensitivity":
        groups, sensitivity = measured_groups(
            groups, apply, lambda m: calibration_loss(m, batches, device_of(model), loss), sensitivity_points, log)
    latency = layer_latency(groups, predictor)

    def measure_many(models: dict[str, nn.Module]) -> dict[str, float]:
        t = measure_models({"dense": model, **models}, input_shape, work_dir, setup.backend, setup.batch_size,
                           setup.threads, setup.warmup, setup.iters, setup.rounds)
        return {k: v["p50"] for k, v in t.items()}

    group_refit = None
    if setup.refit_groups:
        latency, group_refit = refit_per_group(groups, latency, apply, measure_many, log)

    def measure(m: nn.Module) -> tuple[float, float]:
        t = measure_many({"pruned": m})
        log(f"  measured: pruned {t['pruned']:.3f} ms, dense {t['dense']:.3f} ms ({t['pruned'] / t['dense']:.3f} x)")
        return t["dense"], t["pruned"]

    result = fit_to_budget(groups, latency, budget, apply, measure, setup.tolerance, setup.refits, setup.lookahead)
    table.save()
    block = per_layer_block(model, groups, ratios_for(groups, result.last.widths))
    return LatencyFit(result, groups, latency, predictor, table, block, sensitivity, group_refit)


def refit_per_group(groups: Sequence[ChannelGroup], latency: LayerLatency, narrow: Callable[[list[int]], nn.Module],
                    measure_many: Callable[[dict[str, nn.Module]], dict[str, float]],
                    log: Callable[[str], None]) -> tuple[LayerLatency, dict]:
    """The table with each group's saving corrected by its end-to-end measurement
    (:func:`compress.search.allocator.group_factors`), and the report of the factors."""
    factors, report = group_factors(groups, latency, narrow, measure_many)
    log("  per-group re-fit: " + ", ".join(f"{k} x{v['factor']:.2f}" for k, v in report["groups"].items()))
    return corrected(latency, factors), report


@dataclass
class SearchSeed:
    """The allocator's solution inside a search: the measured fit and its per-group ratios in the
    search pruner's group order (ready to enqueue as a trial and to paste as a ``per_layer`` block)."""

    fit: FitResult
    group_ratios: list[float]
    widths: dict[str, int]
    group_refit: dict | None = None


def allocate_for_search(search_pruner, predictor: LatencyPredictor, budget: float,
                        measure: Callable[[nn.Module], tuple[float, float]], tolerance: float,
                        refits: int = 3, cost: str = "importance", sensitivity_points: int = 3,
                        log: Callable[[str], None] = lambda s: None,
                        measure_many: Callable[[dict[str, nn.Module]], dict[str, float]] | None = None) -> SearchSeed:
    """Run the allocator with the search's own pruner (:class:`compress.search.candidates.Pruner`: its
    importance, guards, round_to and max_ratio) on the search's calibrated latency table; ``cost`` as in
    :func:`fit_latency` (sensitivity: on the pruner's calibration batches, cross-entropy). With
    ``measure_many`` (models -> ms, interleaved with dense) the table is re-fit per group first."""
    from ..structured.criteria import IMPORTANCES
    from ..structured.criteria import calibrate as calibrate_criterion

    dense = copy.deepcopy(search_pruner.dense)
    example = search_pruner.example
    crit = IMPORTANCES.get(search_pruner.importance, field="importance")
    imp = crit.build()
    calibrate_criterion(crit, imp, dense, search_pruner.calibration if (crit.needs or crit.calibrate) else [],
                        search_pruner.device)
    first, output = structured.io_layers(dense, example)
    guards = structured.Guards(round_to=search_pruner.round_to)
    patterns = list(search_pruner.ignore or []) + ([output] if output else [])
    groups = channel_groups(dense, example, imp, patterns, round_to=guards.round_to, min_floor=guards.floor,
                            first_conv=first, first_conv_max_ratio=guards.first_conv_max_ratio,
                            max_ratio=search_pruner.max_ratio)
    index = {g["root"]: i for i, g in enumerate(search_pruner.groups)}

    def to_search_order(widths: list[int]) -> list[float]:
        out = [0.0] * len(search_pruner.groups)
        for g, r in zip(groups, ratios_for(groups, widths)):
            if g.name in index:
                out[index[g.name]] = r
        return out

    def prune(w: list[int]) -> nn.Module:
        return search_pruner.prune("per_layer", group_ratios=to_search_order(w))

    if cost == "sensitivity":
        groups, _ = measured_groups(groups, prune, lambda m: calibration_loss(m, search_pruner.calibration,
                                                                              search_pruner.device),
                                    sensitivity_points, log)
    latency = layer_latency(groups, predictor)
    group_refit = None
    if measure_many is not None:
        latency, group_refit = refit_per_group(groups, latency, prune, measure_many, log)
    result = fit_to_budget(groups, latency, budget, prune, measure, tolerance, refits)
    return SearchSeed(result, to_search_order(result.last.widths),
                      {g.name: w for g, w in zip(groups, result.last.widths)}, group_refit)
