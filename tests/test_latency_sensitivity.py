"""The latency allocator's measured cost (``target: {latency: ..., cost: sensitivity}``): the curve
through the measured loss increases, the widths probed, the BN-re-estimated calibration loss, the
allocator spending the cut on the group the loss does not depend on, and the prune stage end to end."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe
from torch import nn

from compress.search.allocator import (
    ChannelGroup,
    LayerLatency,
    allocate,
    allowed_widths,
)
from compress.search.sensitivity import (
    calibration_loss,
    curve_costs,
    measured_groups,
    probe_widths,
)

torch.set_num_threads(1)


def test_curve_costs_pass_through_the_measured_points_never_decreasing():
    # 8 channels; measured at 6, 4 and 2 kept: +0.2, +0.1 (a dip: noise, held at 0.2), +1.0
    costs = curve_costs(8, {6: 0.2, 4: 0.1, 2: 1.0})
    cum = [sum(costs[:k]) for k in range(9)]
    assert cum == pytest.approx([0, 0.1, 0.2, 0.2, 0.2, 0.6, 1.0, 1.0, 1.0])
    assert curve_costs(4, {2: -0.3}) == pytest.approx([0, 0, 0, 0])   # a loss that fell is no cost
    g = ChannelGroup("g", 8, [8, 6, 4, 2], costs, ordered=True)      # kept in removal order, not sorted
    assert g.removal_cost(8, 6) == pytest.approx(0.2) and g.removal_cost(4, 2) == pytest.approx(0.8)


def test_probe_widths_spread_from_dense_to_the_floor():
    g = ChannelGroup("g", 64, allowed_widths(64, 8, 8), [1.0] * 64)
    assert probe_widths(g, 3) == [48, 24, 8]
    assert probe_widths(g, 1) == [8]
    assert probe_widths(ChannelGroup("h", 16, [16, 8], [1.0] * 16), 3) == [8]
    assert probe_widths(ChannelGroup("k", 8, [8], [1.0] * 8), 3) == []


class _Narrowed(nn.Module):
    """What an injected ``narrow`` returns: a module that only remembers the widths it was given."""

    def __init__(self, widths):
        super().__init__()
        self.widths = widths


def test_the_allocator_spends_the_cut_where_the_measured_loss_does_not_grow():
    # two groups whose importance scores say "a" is cheaper to cut; the measured loss says the opposite
    groups = [ChannelGroup("a", 32, allowed_widths(32, 8, 8), [0.1] * 32, ["x.out"]),
              ChannelGroup("b", 32, allowed_widths(32, 8, 8), [1.0] * 32, ["y.out"])]
    lat = LayerLatency({"x": (None, 0, 3, 32), "y": (None, 1, 3, 32)}, lambda n, ci, co: co / 32)
    assert allocate(groups, lat, 1.5).widths == [16, 32]   # by importance: "a" is cut

    def loss_of(m):  # the loss grows steeply with a's cut and barely with b's
        wa, wb = m.widths
        return 1.0 + 2.0 * (32 - wa) / 32 + 0.01 * (32 - wb) / 32

    measured, report = measured_groups(groups, _Narrowed, loss_of, points=3)
    assert report["dense_loss"] == pytest.approx(1.0)
    assert report["groups"]["a"] == {24: pytest.approx(0.5), 16: pytest.approx(1.0), 8: pytest.approx(1.5)}
    assert allocate(measured, lat, 1.5).widths == [32, 16]  # measured: "b" is cut instead


def test_calibration_loss_reestimates_batchnorm_on_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    before = model[1].running_mean.clone()
    batches = [(torch.randn(8, 3, 8, 8) * 3 + 1, torch.randint(0, 3, (8,))) for _ in range(2)]
    got = calibration_loss(model, batches, "cpu")
    assert torch.equal(model[1].running_mean, before) and not model.training   # the model is left as is
    ref = __import__("copy").deepcopy(model)
    ref[1].reset_running_stats()
    ref[1].momentum = None
    ref.train()
    with torch.no_grad():
        for xb, _ in batches:
            ref(xb)
        ref.eval()
        want = sum(float(nn.functional.cross_entropy(ref(x), y)) for x, y in batches) / 2
    assert got == pytest.approx(want)


def test_a_cost_on_a_macs_target_is_an_input_error():
    from pydantic import ValidationError

    from compress.stages.prune import TargetConfig

    with pytest.raises(ValidationError, match="cost only apply to a latency target"):
        TargetConfig(macs=0.5, cost="sensitivity")
    assert TargetConfig(latency=0.5, cost="sensitivity").sensitivity_points == 3


def test_prune_to_a_latency_target_with_the_measured_cost_and_the_per_group_refit(write_recipe, tmp_path, one_thread):
    from conftest import cli

    r = tiny_recipe()
    r["stages"] = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
                   {"kind": "prune", "importance": "l2", "calibration_batches": 2,
                    "target": {"latency": 0.7, "tolerance": 0.5, "refits": 1, "cost": "sensitivity",
                               "sensitivity_points": 2, "refit_groups": True}},
                   {"kind": "benchmark", "batch_sizes": [8], "iters": 20, "rounds": 2, "warmup": 2}]
    out = tmp_path / "run"
    res = cli("run", str(write_recipe(r)), "--out", str(out))
    assert res.returncode == 0, res.stderr
    fit = json.loads((out / "stages" / "01-prune" / "latency_fit.json").read_text())
    sens = fit["sensitivity"]
    assert sens["dense_loss"] > 0 and set(sens["groups"]) == set(fit["dense_widths"])
    probed = [w for g in sens["groups"].values() for w in g]
    assert probed and all(int(w) < fit["dense_widths"][g] for g, ws in sens["groups"].items() for w in ws)
    assert fit["within_budget"] and any(w < fit["dense_widths"][g] for g, w in fit["widths"].items())
    # the per-group re-fit measured the groups the table says save at least 1 % each, factors clamped
    assert all(0.25 <= r["factor"] <= 4.0 and r["width"] < fit["dense_widths"][g]
               for g, r in fit["group_refit"]["groups"].items())


def test_per_group_refit_moves_the_cut_to_where_the_backend_has_the_latency():
    """The injected table says layers x (group a) and y (group b) save alike; the "backend" (a known
    function of the widths) saves 1.5x the table's saving on a and 0.5x on b. One interleaved
    measurement of each group narrowed alone finds those factors, and the allocator, which cut b
    (cheaper by importance) on the table alone, cuts a instead and lands within the limit as measured."""
    from compress.search.allocator import corrected, group_factors

    groups = [ChannelGroup("a", 32, allowed_widths(32, 8, 8), [2.0] * 32, ["x.out"]),
              ChannelGroup("b", 32, allowed_widths(32, 8, 8), [1.0] * 32, ["y.out"]),
              ChannelGroup("c", 32, allowed_widths(32, 8, 8), [1.0] * 32, ["z.out"])]
    table = {"x": lambda co: co / 32, "y": lambda co: co / 32, "z": lambda co: 0.001 * co / 32}
    lat = LayerLatency({"x": (None, 0, 3, 32), "y": (None, 1, 3, 32), "z": (None, 2, 3, 32)},
                       lambda n, ci, co: table[n](co))

    def backend_ms(widths):
        wa, wb, wc = widths
        return (1 - 1.5 * (1 - wa / 32)) + (1 - 0.5 * (1 - wb / 32)) + 0.001 * wc / 32

    measured_calls = []

    def measure(models):
        measured_calls.append(sorted(models))
        return {"dense": backend_ms([32, 32, 32]), **{k: backend_ms(m.widths) for k, m in models.items()}}

    factors, report = group_factors(groups, lat, _Narrowed, measure)
    assert measured_calls == [["g0", "g1"]]          # one interleaved run; c saves < 1 % by the table: not probed
    assert factors == {0: pytest.approx(1.5), 1: pytest.approx(0.5)}
    assert report["groups"]["a"]["width"] == 16 and report["groups"]["b"]["factor"] == pytest.approx(0.5)
    # a backend that saves twice what the table says everywhere: the level is the end-to-end re-fit's job,
    # the factors only move savings between groups
    doubled, rep2 = group_factors(groups, lat, _Narrowed, lambda models: {
        "dense": 2.0, **{k: 2.0 - 2 * (backend_ms([32, 32, 32]) - backend_ms(m.widths)) for k, m in models.items()}})
    assert doubled == {0: pytest.approx(1.5), 1: pytest.approx(0.5)} and rep2["level"] == pytest.approx(2.0, rel=1e-3)
    fixed = corrected(lat, factors)
    assert fixed.total([32, 32, 32]) == pytest.approx(lat.total([32, 32, 32]))   # dense unchanged
    for w in ([16, 32, 32], [32, 8, 32], [24, 16, 32]):
        assert fixed.total(w) == pytest.approx(backend_ms(w))

    limit = 1.51
    on_table = allocate(groups, lat, limit).widths
    on_refit = allocate(groups, fixed, limit).widths
    assert on_table == [32, 16, 32] and backend_ms(on_table) > limit * 1.1
    assert on_refit == [16, 32, 32] and backend_ms(on_refit) <= limit


def test_the_search_allocator_takes_the_measured_cost_and_the_per_group_refit(tmp_path):
    """``allocator_cost: sensitivity`` and ``allocator_refit_groups`` in the search: the allocator's groups
    carry measured curves (the search pruner's calibration batches) and the table is re-fit per group."""
    from compress.search.candidates import Pruner, measure_models
    from compress.search.latency_table import LatencyPredictor, LatencyTable
    from compress.search.latency_target import allocate_for_search
    from compress.zoo import MODELS

    torch.manual_seed(0)
    dense = MODELS.get("small_cnn")(num_classes=4, in_channels=1, width=16).eval()
    shape = (1, 16, 16)
    calib = [(torch.randn(16, *shape), torch.randint(0, 4, (16,))) for _ in range(2)]
    pruner = Pruner(dense, shape, "l2", 8, None, 0.8, calib)
    table = LatencyTable(tmp_path / "table.json", "onnxruntime", 1, 1)
    predictor = LatencyPredictor(dense, shape, table, pruner.prunable, (0.5, 1.0), 8)
    predictor.warm(dense)

    def measure_many(models):
        t = measure_models({"dense": dense, **models}, shape, tmp_path / "onnx", "onnxruntime", 1, 1, 1, 6, 2)
        return {k: v["p50"] for k, v in t.items()}

    def measure(m):
        t = measure_many({"m": m})
        return t["dense"], t["m"]

    lines = []
    seed = allocate_for_search(pruner, predictor, 0.6, measure, tolerance=1.0, refits=0, cost="sensitivity",
                               sensitivity_points=1, log=lines.append, measure_many=measure_many)
    assert any(line.startswith("  sensitivity ") for line in lines)
    assert seed.group_refit is not None and "level" in seed.group_refit
    assert len(seed.group_ratios) == len(pruner.groups) and seed.fit.attempts
