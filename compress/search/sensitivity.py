"""Measured sensitivity: the accuracy twin of the latency table, an alternative removal cost for the
latency allocator (``target: {latency: ..., cost: sensitivity}``).

The allocator's default cost (:func:`compress.search.allocator.removal_costs`) is the importance
criterion's scores, summed over the layers a group cuts: a proxy for what the network loses. Here the
loss is measured instead: each channel group is narrowed *on its own* (every other group dense) to a few
widths the guards allow, BatchNorm statistics are re-estimated on the calibration batches (adaptive BN,
Li et al., EagleEye 2020: without it a narrowed layer's stale statistics dominate the loss), and the
task's loss on the same batches is compared with the dense model's (BatchNorm re-estimated the same
way, so both sides carry the same estimation error). The loss increase at those widths, interpolated
linearly in the number of channels removed (and never decreasing: a measured dip is noise), becomes the
group's per-channel cost curve. The channels removed are the criterion's least important ones, exactly as
the pruner removes them, so the curve prices the cut the allocator will actually make.

One group at a time ignores interactions between groups (the same first-order assumption as every
importance criterion); it costs ``groups x points`` prunes and BN re-estimations on a copy of the model.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

from ..metrics import call_model, to_device
from .allocator import ChannelGroup
from .candidates import recalibrate_batchnorm


def probe_widths(group: ChannelGroup, points: int) -> list[int]:
    """Up to ``points`` allowed widths below dense, spread evenly between dense and the narrowest
    allowed width (which is always one of them), descending."""
    lower = [w for w in group.widths if w < group.dense]
    if not lower or points < 1:
        return []
    floor = lower[-1]
    out = []
    for k in range(points - 1, -1, -1):
        want = floor + (group.dense - floor) * k / points
        out.append(min(lower, key=lambda w: (abs(w - want), w)))
    return sorted(set(out), reverse=True)


def curve_costs(dense: int, measured: dict[int, float]) -> list[float]:
    """Per-channel costs (the ``i``-th entry: removing the ``i``-th channel) whose running sum passes
    through (0 removed, 0) and (``dense - w``, ``measured[w]``) for every probed width ``w``, linear in
    between and flat past the narrowest probe; the measured increases are made non-decreasing first
    (a narrower model that measured a smaller loss is noise, not a gain) and negative ones are zero."""
    knots = [(0, 0.0)]
    best = 0.0
    for w in sorted(measured, reverse=True):
        best = max(best, float(measured[w]))
        knots.append((dense - w, best))
    cum = []
    for removed in range(dense + 1):
        for (x0, y0), (x1, y1) in pairwise(knots):
            if removed <= x1:
                cum.append(y0 + (y1 - y0) * (removed - x0) / max(1, x1 - x0))
                break
        else:
            cum.append(knots[-1][1])
    return [b - a for a, b in pairwise(cum)]


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence, device, loss: Callable | None = None) -> float:
    """Mean task loss of a copy of ``model`` on ``batches`` after re-estimating its BatchNorm statistics
    on the same batches (cumulative average; ``model`` itself is left as is)."""
    from ..structured.criteria import classification_loss

    loss_fn = loss or classification_loss
    m = copy.deepcopy(model)
    recalibrate_batchnorm(m, batches, len(batches), device)
    m.eval()
    total, n = 0.0, 0
    for xb, yb in batches:
        total += float(loss_fn(call_model(m, to_device(xb, device)), yb.to(device)))
        n += 1
    return total / max(1, n)


def measured_groups(groups: Sequence[ChannelGroup], narrow: Callable[[list[int]], nn.Module],
                    loss_of: Callable[[nn.Module], float], points: int = 3,
                    log: Callable[[str], None] = lambda s: None) -> tuple[list[ChannelGroup], dict]:
    """``groups`` with their costs replaced by measured loss-increase curves.

    ``narrow(widths)`` prunes a copy of the dense model to ``widths`` (one per group);
    ``loss_of(model)`` is its calibration loss (:func:`calibration_loss`). Returns the new groups and a
    report ``{group: {width: loss increase}}`` with the dense loss under ``"dense_loss"``."""
    dense_widths = [g.dense for g in groups]
    base = loss_of(narrow(list(dense_widths)))
    report: dict = {"dense_loss": base, "groups": {}}
    out = []
    for gi, g in enumerate(groups):
        measured = {}
        for w in probe_widths(g, points):
            widths = list(dense_widths)
            widths[gi] = w
            measured[w] = loss_of(narrow(widths)) - base
        if not math.isfinite(sum(measured.values())):
            measured = {w: (v if math.isfinite(v) else 1e6) for w, v in measured.items()}
        report["groups"][g.name] = {int(w): round(v, 5) for w, v in measured.items()}
        log(f"  sensitivity {g.name}: " + ", ".join(f"{w}: {v:+.3f}" for w, v in measured.items()))
        out.append(ChannelGroup(g.name, g.dense, list(g.widths), curve_costs(g.dense, measured), list(g.members),
                                ordered=True))
    return out, report
