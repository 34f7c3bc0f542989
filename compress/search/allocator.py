"""Spend the pruning where the latency is: a latency-budgeted channel allocator.

The problem, per prunable channel group ``g`` (the dependency-graph groups Torch-Pruning cuts
together): choose a kept width ``w_g`` among the widths the guards allow (multiples of
``round_to``, not below ``min_channels``, the first conv's and ``max_ratio``'s floors) so that
the model's latency fits a budget while the accuracy cost -- the chosen importance criterion's
scores of the removed channels, summed (Torch-Pruning's per-group normalised scores, so groups
compare on one footing) -- is smallest. This is a knapsack (HALP, Shen et al., NeurIPS 2022:
"Structural Pruning via Latency-Saliency Knapsack"); we solve it greedily by cost per
millisecond saved, the classic knapsack approximation, because the latency of a layer depends on
*two* groups (its input and output widths), which a per-group knapsack table cannot express
exactly: each greedy step re-evaluates the saving of every candidate move at the current widths
of the neighbouring groups, so the interaction is exact at every step.

* A move takes one group from its current width to one of the next ``lookahead`` allowed widths
  below it (not only the next one: a latency table can be flat across one step and drop at the
  next, e.g. where a kernel switches to a vectorised path at a multiple of 16).
* The move with the smallest (importance removed) / (ms saved) wins (importance as
  :func:`removal_costs` makes it comparable across groups); ties go to the lower group
  index, then the larger width, so the result is deterministic.
* Moves that save nothing are never taken: removing channels that cost no time only loses accuracy.
* Once within the limit, channels are given back (most importance per ms added first) while the
  limit holds: a multi-width move can overshoot, and the unused slack is accuracy left on the table.

Latency comes from :class:`LayerLatency`: a sum over Conv/Linear layers of a per-layer cost at the
layer's (input, output) width, the widths read from the groups. In production the cost is the
measured per-layer table (:class:`compress.search.latency_table.LatencyPredictor`); tests inject a
known table so the allocator's choice can be checked exactly.

What an isolated-layer table misses (layout reorders at odd widths, fusions, memory traffic between
layers) is caught by measuring end to end: :func:`fit_to_budget` prunes the allocation, times it
interleaved with the dense model (:func:`compress.deploy.timing.time_interleaved`), and when the
measured ratio misses the budget beyond the tolerance it re-fits -- the table's prediction at this
allocation is corrected by the measured/predicted factor, the target tightened by it -- and
continues the greedy from where it stopped. When the refits are spent and the model still misses,
the result says by how much; the caller fails the stage (exit 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..structured import pruner


@dataclass
class ChannelGroup:
    """One prunable channel group: its allowed kept widths and the cost of removing channels."""

    name: str                      # the group's root module
    dense: int                     # channels in the dense model
    widths: list[int]              # allowed kept widths, descending, the first is ``dense``
    scores: list[float]            # per-channel importance, ascending (the cheapest channels first)
    members: list[str] = field(default_factory=list)   # "layer.in" / "layer.out" sides it cuts
    # True: ``scores`` are already per-channel costs in the order the pruner removes the channels (a
    # measured sensitivity curve, :mod:`compress.search.sensitivity`), kept as they are, not sorted
    ordered: bool = False
    _cum: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.scores = [float(s) for s in self.scores] if self.ordered else sorted(float(s) for s in self.scores)
        self._cum = [0.0]
        for s in self.scores:
            self._cum.append(self._cum[-1] + s)

    def removal_cost(self, from_width: int, to_width: int) -> float:
        """Importance of the channels removed going from ``from_width`` to ``to_width`` kept
        (always the least important ones first, as the pruner removes them)."""
        return self._cum[self.dense - to_width] - self._cum[self.dense - from_width]


class LayerLatency:
    """Latency of a model as a function of its groups' widths.

    ``layers`` maps a layer name to ``(in_group, out_group, dense_in, dense_out)`` (a group index or
    None when that side is not pruned); ``cost(name, cin, cout)`` is the layer's time (ms) at those
    widths. A depthwise layer (``depthwise`` names) has in = out, read from whichever side is
    pruned. ``scale`` multiplies every total (the anchor to a measured dense time)."""

    def __init__(self, layers: dict[str, tuple[int | None, int | None, int, int]],
                 cost: Callable[[str, int, int], float], depthwise: Iterable[str] = (), scale: float = 1.0):
        self.layers = dict(layers)
        self.cost = cost
        self.depthwise = set(depthwise)
        self.scale = scale
        self._cache: dict[tuple[str, int, int], float] = {}
        self.touching: dict[int, list[str]] = {}
        for name, (gi, go, _, _) in self.layers.items():
            for g in {gi, go} - {None}:
                self.touching.setdefault(g, []).append(name)

    def _io(self, name: str, widths: Sequence[int]) -> tuple[int, int]:
        gi, go, ci, co = self.layers[name]
        cin = widths[gi] if gi is not None else ci
        cout = widths[go] if go is not None else co
        if name in self.depthwise:
            w = cout if go is not None else cin
            return w, w
        return cin, cout

    def layer(self, name: str, widths: Sequence[int]) -> float:
        ci, co = self._io(name, widths)
        key = (name, ci, co)
        if key not in self._cache:
            self._cache[key] = float(self.cost(name, ci, co))
        return self._cache[key]

    def total(self, widths: Sequence[int]) -> float:
        return self.scale * sum(self.layer(n, widths) for n in self.layers)

    def delta(self, widths: Sequence[int], group: int, new_width: int) -> float:
        """total(widths with ``group`` at ``new_width``) - total(widths), from the touched layers only."""
        names = self.touching.get(group, [])
        before = sum(self.layer(n, widths) for n in names)
        moved = list(widths)
        moved[group] = new_width
        after = sum(self.layer(n, moved) for n in names)
        return self.scale * (after - before)


def corrected(latency: LayerLatency, factors: dict[int, float]) -> LayerLatency:
    """``latency`` with each group's *saving* scaled by its end-to-end factor (:func:`group_factors`):
    a layer's time at narrowed widths is ``dense - f * (dense - table)``, ``f`` the factor of the group
    narrowed on it (the geometric mean when both its sides are narrowed), so the dense total is
    unchanged and the distribution of the savings over the groups follows the measurement."""
    def cost(name: str, ci: int, co: int) -> float:
        gi, go, dci, dco = latency.layers[name]
        raw, dense = latency.cost(name, ci, co), latency.cost(name, dci, dco)
        narrowed = {g for g, w, d in ((gi, ci, dci), (go, co, dco)) if g is not None and w < d}
        f = math.prod(factors.get(g, 1.0) for g in narrowed) ** (1.0 / len(narrowed)) if narrowed else 1.0
        return max(0.0, dense - f * (dense - raw))
    return LayerLatency(latency.layers, cost, latency.depthwise, latency.scale)


def probe_width(group: ChannelGroup) -> int:
    """The allowed width nearest half the dense width (the narrower on a tie): where one group's
    end-to-end saving is large enough to measure and still in the range the allocator uses."""
    lower = [w for w in group.widths if w < group.dense]
    return min(lower, key=lambda w: (abs(w - group.dense / 2), w)) if lower else group.dense


def group_factors(groups: Sequence[ChannelGroup], latency: LayerLatency,
                  narrow: Callable[[list[int]], nn.Module],
                  measure: Callable[[dict[str, nn.Module]], dict[str, float]],
                  clamp: tuple[float, float] = (0.25, 4.0), min_saving: float = 0.01) -> tuple[dict[int, float], dict]:
    """Per-group re-fit of the latency table: narrow each group alone to :func:`probe_width`, time all of
    them end to end *in one interleaved run* with the dense model (``measure(models) -> {name: ms}``, the
    dense model under ``"dense"``), and return each group's factor = measured saving / the table's
    saving (both as fractions of dense), relative to the same ratio over all probed groups (so the
    factors move savings between groups and leave their sum), clamped to ``clamp``. A group whose table saving is under
    ``min_saving`` of dense keeps factor 1: its measured saving would be mostly timing noise.

    Why: one global measured/predicted factor cannot fix a table whose *distribution* is wrong (what an
    isolated-layer table misses -- layout reorders, fusions, memory traffic -- is not spread over the
    layers in proportion to their isolated times), and the allocator then spends the cut where the
    table, not the backend, has the latency."""
    dense_widths = [g.dense for g in groups]
    dense_pred = latency.total(dense_widths)
    probes: dict[str, tuple[int, int, float]] = {}
    models: dict[str, nn.Module] = {}
    for gi, g in enumerate(groups):
        w = probe_width(g)
        if w >= g.dense:
            continue
        widths = list(dense_widths)
        widths[gi] = w
        predicted = 1.0 - latency.total(widths) / dense_pred
        if predicted < min_saving:
            continue
        key = f"g{gi}"
        probes[key] = (gi, w, predicted)
        models[key] = narrow(widths)
    factors: dict[int, float] = {}
    report: dict = {"level": None, "groups": {}}
    if models:
        ms = measure(models)
        saved = {key: 1.0 - ms[key] / ms["dense"] for key in probes}
        # only the distribution is corrected here: the factors are relative to the overall measured/table
        # ratio of the savings (the level is fit_to_budget's end-to-end re-fit's job; uncorrected, a table
        # that under-predicts every saving 3x would make every deep cut look free, linear extrapolation
        # of the factor past the probe width driving layer times to zero)
        level = sum(saved.values()) / sum(p for _, _, p in probes.values())
        report = {"level": round(level, 4), "groups": {}}
        if level <= 0:
            report["skipped"] = "the groups narrowed alone measured no saving in all"
            return {}, report
        for key, (gi, w, predicted) in probes.items():
            factors[gi] = min(clamp[1], max(clamp[0], saved[key] / predicted / level))
            report["groups"][groups[gi].name] = {"width": w, "table_saving": round(predicted, 4),
                                                 "measured_saving": round(saved[key], 4),
                                                 "factor": round(factors[gi], 3)}
    return factors, report


@dataclass
class Allocation:
    widths: list[int]
    predicted_ms: float
    feasible: bool                 # predicted <= limit
    cost: float                    # importance removed in all
    moves: int


def allocate(groups: Sequence[ChannelGroup], latency: LayerLatency, limit_ms: float,
             start: Sequence[int] | None = None, lookahead: int = 4) -> Allocation:
    """Greedy knapsack: from ``start`` (default dense), remove the channels with the least importance per
    millisecond saved until the predicted latency is at most ``limit_ms`` or no move saves time."""
    widths = list(start) if start is not None else [g.dense for g in groups]
    current = latency.total(widths)
    cost, moves = 0.0, 0
    while current > limit_ms:
        best = None
        for gi, g in enumerate(groups):
            lower = [w for w in g.widths if w < widths[gi]][:lookahead]
            for w in lower:
                saved = -latency.delta(widths, gi, w)
                if saved <= 1e-12:
                    continue
                c = g.removal_cost(widths[gi], w)
                key = (c / saved, gi, -w)
                if best is None or key < best[0]:
                    best = (key, gi, w, saved, c)
        if best is None:
            break
        _, gi, w, saved, c = best
        widths[gi] = w
        current -= saved
        cost += c
        moves += 1
    if current <= limit_ms:
        # fill the knapsack back up: a move of several widths at once can overshoot the limit; give
        # back the channels worth the most importance per ms they add while the limit still holds
        while True:
            best = None
            for gi, g in enumerate(groups):
                higher = [w for w in reversed(g.widths) if w > widths[gi]][:lookahead]
                for w in higher:
                    added = latency.delta(widths, gi, w)
                    if current + added > limit_ms + 1e-12:
                        continue
                    gain = g.removal_cost(w, widths[gi])
                    if gain <= 0:
                        continue
                    key = (-gain / max(added, 1e-12), gi, w)
                    if best is None or key < best[0]:
                        best = (key, gi, w, added, gain)
            if best is None:
                break
            _, gi, w, added, gain = best
            widths[gi] = w
            current += added
            cost -= gain
            moves += 1
    current = latency.total(widths)  # re-summed, no drift from the increments
    return Allocation(widths, current, current <= limit_ms + 1e-12, cost, moves)


@dataclass
class FitAttempt:
    widths: list[int]
    target_ratio: float            # the table-relative target this attempt aimed at
    predicted_ratio: float         # table prediction / table dense
    measured_ratio: float          # measured end to end / dense, interleaved
    dense_ms: float
    model_ms: float


@dataclass
class FitResult:
    attempts: list[FitAttempt]
    model: nn.Module               # the chosen attempt's model
    within: bool
    budget: float
    tolerance: float
    chosen: int = -1               # index of the attempt ``model`` is (the last one unless an earlier fit was closer)

    @property
    def last(self) -> FitAttempt:
        """The chosen attempt (the one ``model`` is)."""
        return self.attempts[self.chosen]

    def shortfall(self) -> str:
        a = self.last
        limit = self.budget * (1 + self.tolerance)
        over = 100.0 * (a.measured_ratio / limit - 1.0)
        return (f"measured {a.model_ms:.3f} ms vs dense {a.dense_ms:.3f} ms = {a.measured_ratio:.3f} x dense, "
                f"over the budget {self.budget:g} x (+{self.tolerance:.0%} tolerance = {limit:.3f} x) by {over:.1f} % "
                f"after {len(self.attempts)} measured allocation(s)")


def fit_to_budget(groups: Sequence[ChannelGroup], latency: LayerLatency, budget: float,
                  apply: Callable[[list[int]], nn.Module], measure: Callable[[nn.Module], tuple[float, float]],
                  tolerance: float = 0.05, refits: int = 3, lookahead: int = 4) -> FitResult:
    """Allocate for ``budget`` (fraction of dense), prune with ``apply(widths)``, measure with
    ``measure(model) -> (dense_ms, model_ms)`` (interleaved); re-fit up to ``refits`` times while the
    measured ratio is outside ``budget * (1 +- tolerance)``.

    Over the budget, the table's target is tightened by the measured/predicted factor and the greedy
    continues from where it stopped. Under it by more than the tolerance (the table over-predicted),
    the target is raised by the same factor and the allocation redone from dense: a model much faster
    than asked for has given up accuracy for nothing, and an allocator compared with baselines at
    "equal latency" must land at the budget, not below it. The result is the within-budget attempt
    closest to the budget (the last attempt when none was within)."""
    dense_widths = [g.dense for g in groups]
    dense_pred = latency.total(dense_widths)
    target = budget
    widths: list[int] | None = None
    start: list[int] | None = None
    attempts: list[FitAttempt] = []
    models: list[nn.Module] = []
    limit = budget * (1 + tolerance)
    for _ in range(refits + 1):
        alloc = allocate(groups, latency, target * dense_pred, start=start, lookahead=lookahead)
        if any(a.widths == alloc.widths for a in attempts):
            break  # measured already: another measurement would say the same
        widths = alloc.widths
        model = apply(widths)
        dense_ms, model_ms = measure(model)
        measured = model_ms / dense_ms
        predicted = alloc.predicted_ms / dense_pred
        attempts.append(FitAttempt(list(widths), target, predicted, measured, dense_ms, model_ms))
        models.append(model)
        if budget * (1 - tolerance) <= measured <= limit:
            break
        # re-fit: the table predicted ``predicted`` where the model measures ``measured``; aim the
        # table at the budget corrected by that factor
        correction = measured / max(1e-9, predicted)
        if measured > limit:
            target, start = min(target * 0.97, budget / correction), widths  # always a little lower
        else:
            raised = budget / correction
            if raised <= target * 1.01:
                break  # the table cannot be aimed higher
            target, start = raised, None
    within = [i for i, a in enumerate(attempts) if a.measured_ratio <= limit]
    chosen = max(within, key=lambda i: attempts[i].measured_ratio) if within else len(attempts) - 1
    return FitResult(attempts, models[chosen], bool(within), budget, tolerance, chosen)


# ---------------------------------------------------------------------------------------------
# Building the groups and the latency model from a real network.

def allowed_widths(dense: int, floor: int, round_to: int | None) -> list[int]:
    """Kept widths the guards allow, descending: ``dense`` and the multiples of ``round_to`` from
    ``floor`` up (without round_to: 32 evenly spaced widths at most)."""
    step = round_to or max(1, dense // 32)
    lo = max(1, math.ceil(floor / step) * step)
    return sorted({dense, *range(lo, dense, step)}, reverse=True)


@torch.no_grad()
def _scores(importance, group) -> list[float]:
    s = importance(group)
    if s is None:
        return []
    return [float(v) for v in torch.as_tensor(s).flatten().tolist()]


def channel_groups(model: nn.Module, example: torch.Tensor, importance, ignore: Iterable[str], *,
                   round_to: int | None, min_floor: Callable[[int], int], first_conv: str | None,
                   first_conv_max_ratio: float | None, max_ratio: float) -> list[ChannelGroup]:
    """The model's prunable groups (same order as :func:`compress.structured.pruner.describe_groups`)
    with the criterion's per-channel scores and the widths the guards allow.

    ``importance`` is a Torch-Pruning importance, already calibrated on ``model`` if it needs data."""
    out = []
    for group, root, dense, members in pruner.channel_groups(model, example, list(ignore)):
        floor = min_floor(dense)
        if first_conv is not None and first_conv_max_ratio is not None and f"{first_conv}.out" in members:
            floor = max(floor, math.ceil(dense * (1 - first_conv_max_ratio)))
        floor = max(floor, math.ceil(dense * (1 - max_ratio)))
        scores = _scores(importance, group)
        if len(scores) != dense:  # a criterion that scores a grouped layer per slice: spread it evenly
            scores = (scores * (dense // max(1, len(scores)) + 1))[:dense] if scores else [1.0] * dense
        out.append(ChannelGroup(root, dense, allowed_widths(dense, floor, round_to),
                                removal_costs(scores, members), members))
    return out


def removal_costs(scores: Sequence[float], members: Sequence[str]) -> list[float]:
    """Per-channel accuracy cost of a group, comparable across groups: each channel's share of the
    group's importance, times the number of Conv/Linear layer sides the group cuts.

    Why not the criterion's scores as they are: Torch-Pruning reduces a group's scores by the *mean*
    over its layers and normalises them to mean 1, so a channel of a residual stream cut in eight
    layers cost the same as a channel cut in two, while the latency it saves is summed over all eight
    layers -- the allocator then cut every residual stream to the guard floor (ResNet-20 on CIFAR-10:
    17 % test accuracy where uniform kept 32 %). And a channel of a 16-wide layer cost the same as one
    of a 64-wide layer, so narrow layers were emptied first. Here removing a fraction ``f`` of a group's
    importance costs ``f`` per layer it touches: summed over layers like the latency, and relative to
    the layer's width like uniform pruning (which is a strong baseline for a reason).

    And narrowing hurts more the narrower a layer already is: the ``i``-th cheapest channel's share is
    scaled by ``dense / (dense - i)`` (the channels left when it goes), so cutting a group to ``k`` of
    ``n`` channels of equal score costs about ``sides * ln(n / k)``: the allocator maximises the
    (side-weighted) geometric mean of the kept fractions per millisecond instead of emptying the layers
    with the most latency per channel. On the trained ResNet-20 (CIFAR-10, batch 1, 0.5x dense by the
    table), BatchNorm-re-estimated validation accuracy of the allocation: 37.8 % with this cost, 30.8 %
    with the plain share, uniform 29.0 %, global 26.4 % (benchmarks/results/latency_allocation.md)."""
    sides = max(1, sum(1 for m in members if m.endswith((".in", ".out"))))
    positive = sorted(max(0.0, float(s)) for s in scores)
    n = len(positive)
    total = sum(positive)
    shares = [s / total for s in positive] if total > 0 else [1.0 / max(1, n)] * n
    return [sides * share * n / (n - i) for i, share in enumerate(shares)]


def layer_latency(groups: Sequence[ChannelGroup], predictor) -> LayerLatency:
    """The measured per-layer table as a function of group widths
    (:meth:`compress.search.latency_table.LatencyPredictor.layer_ms_at`)."""
    side: dict[str, int] = {}
    for gi, g in enumerate(groups):
        for m in g.members:
            side.setdefault(m, gi)
    layers = {}
    depthwise = set()
    for name, info in predictor.layers.items():
        ci, co = info["dense"]
        layers[name] = (side.get(f"{name}.in"), side.get(f"{name}.out"), ci, co)
        if info["depthwise"]:
            depthwise.add(name)
    return LayerLatency(layers, predictor.layer_ms_at, depthwise)


def ratios_for(groups: Sequence[ChannelGroup], widths: Sequence[int]) -> list[float]:
    """Per-group pruning ratios that keep exactly ``widths``. Torch-Pruning keeps
    ``int(channels * (1 - ratio))``, so the ratio sits a hair *below* the exact fraction (floored at
    six decimals, printable in a recipe) and the product never rounds one channel short."""
    return [0.0 if w >= g.dense else math.floor(((g.dense - w) / g.dense - 1e-7) * 1e6) / 1e6
            for g, w in zip(groups, widths)]
