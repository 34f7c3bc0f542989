"""The latency allocator: exact choices on a toy problem whose latency table is injected, the
widths it asks for are the widths the pruner produces, and the prune stage's latency target is
enforced end to end (met -> reported; impossible -> exit 3 saying by how much)."""
from __future__ import annotations

import json

import pytest
import torch

from compress.search.allocator import (ChannelGroup, LayerLatency, allocate, allowed_widths, fit_to_budget,
                                       ratios_for)

from conftest import tiny_recipe

torch.set_num_threads(1)


def _toy():
    """Two groups of 32 channels feeding three layers. Group 0 is cheap to cut (low scores), group 1
    expensive; the injected table makes layer b (group 0 -> group 1) by far the slowest."""
    groups = [ChannelGroup("a", 32, allowed_widths(32, 8, 8), [0.1] * 32, ["a.out", "b.in"]),
              ChannelGroup("b", 32, allowed_widths(32, 8, 8), [1.0] * 32, ["b.out", "c.in"])]
    layers = {"a": (None, 0, 3, 32), "b": (0, 1, 32, 32), "c": (1, None, 32, 10)}
    ms_per_channel = {"a": 0.01, "b": 0.001, "c": 0.02}

    def cost(name, ci, co):  # a known table: time proportional to in x out (plus a fixed part)
        return 0.05 + ms_per_channel[name] * ci * co / (32 if name != "b" else 1)
    return groups, LayerLatency(layers, cost)


def test_allowed_widths_follow_round_to_and_the_floor():
    assert allowed_widths(32, 8, 8) == [32, 24, 16, 8]
    assert allowed_widths(64, 20, 8) == [64, 56, 48, 40, 32, 24]
    assert allowed_widths(10, 1, None) == list(range(10, 0, -1))


def test_allocator_choice_is_exact_on_an_injected_table():
    groups, lat = _toy()
    dense = lat.total([32, 32])
    # by hand: a=0.05+0.01*3*32/32=0.08, b=0.05+0.001*32*32=1.074, c=0.05+0.02*32*10/32=0.25 -> 1.404
    assert dense == pytest.approx(1.404)
    alloc = allocate(groups, lat, 0.5 * dense)
    # every move on group 0 costs 0.1/channel, on group 1 1.0/channel; cutting 0 by 8 saves ~0.264 ms
    # (b) + 0.06 (a); the cheapest cost per ms is group 0 all the way to its floor (8), which leaves
    # b at 0.05 + 0.001*8*32 = 0.306, a at 0.065 and c at 0.25: 0.621 <= 0.702
    assert alloc.widths == [8, 32]
    assert alloc.predicted_ms == pytest.approx(0.05 + 0.01 * 3 * 8 / 32 + 0.05 + 0.001 * 8 * 32 + 0.25)
    assert alloc.feasible and alloc.moves == 3 and alloc.cost == pytest.approx(0.1 * 24)
    # a tighter budget must also cut the expensive group: group 0 is at its floor, only group 1 is left
    tight = allocate(groups, lat, 0.35 * dense)
    assert tight.widths[0] == 8 and tight.widths[1] < 32 and tight.predicted_ms <= 0.35 * dense


def test_allocator_skips_moves_that_save_no_time_and_looks_past_flat_steps():
    # a table with a cliff: width 24 costs as much as 32 (a padded layout); only 16 and below are faster
    groups = [ChannelGroup("g", 32, [32, 24, 16, 8], [1.0] * 32, ["x.out"])]
    table = {32: 1.0, 24: 1.0, 16: 0.5, 8: 0.4}
    lat = LayerLatency({"x": (None, 0, 3, 32)}, lambda n, ci, co: table[co])
    alloc = allocate(groups, lat, 0.9)
    assert alloc.widths == [16]  # 24 saves nothing, so the allocator jumps to 16 in one move
    assert allocate(groups, lat, 0.9, lookahead=1).widths == [32]  # without lookahead it is stuck


def test_fit_to_budget_refits_on_the_measured_ratio_and_reports_the_shortfall():
    groups, lat = _toy()
    measured = []

    def apply(widths):
        return torch.nn.Identity()

    def measure_slow(model):  # end to end the pruned model is 30 % slower than the table predicts
        widths = fit_widths[-1]
        measured.append(widths)
        return 1.0, 1.3 * lat.total(widths) / lat.total([32, 32])

    fit_widths = []

    def apply_record(widths):
        fit_widths.append(list(widths))
        return apply(widths)

    r = fit_to_budget(groups, lat, 0.5, apply_record, measure_slow, tolerance=0.05, refits=3)
    assert len(r.attempts) >= 2 and r.attempts[0].measured_ratio > 0.525
    # the re-fit aims the table lower by the measured/predicted factor (1.3), then meets the budget
    assert r.attempts[1].target_ratio == pytest.approx(min(0.5 * 0.97, 0.5 / 1.3))
    assert r.within and r.last.measured_ratio <= 0.525

    fit_widths.clear()
    impossible = fit_to_budget(groups, lat, 0.05, apply_record, measure_slow, tolerance=0.05, refits=2)
    assert not impossible.within
    assert "over the budget 0.05 x" in impossible.shortfall() and "by " in impossible.shortfall()


def test_fit_to_budget_raises_the_target_when_the_table_over_predicts():
    """A model measured far under its budget gave up accuracy for nothing: the re-fit raises the table's
    target by the measured/predicted factor and re-allocates from dense; the result is the within-budget
    attempt closest to the budget, and ``model`` is that attempt's model."""
    groups, lat = _toy()
    dense = lat.total([32, 32])
    built = []

    def apply(widths):
        built.append(list(widths))
        return torch.nn.Linear(1, 1)

    def measure_fast(model):  # end to end the pruned model is 40 % faster than the table predicts
        return 2.0, 2.0 * 0.6 * lat.total(built[-1]) / dense

    r = fit_to_budget(groups, lat, 0.3, apply, measure_fast, tolerance=0.05, refits=3)
    first = r.attempts[0]
    assert first.measured_ratio < 0.3 * 0.95  # the table's own choice lands far under the budget
    second = r.attempts[1]
    assert second.target_ratio == pytest.approx(0.3 / (first.measured_ratio / first.predicted_ratio))
    assert r.within and first.measured_ratio < r.last.measured_ratio <= 0.3 * 1.05
    assert r.last.widths[1] > first.widths[1]  # channels given back to the expensive group
    assert r.model is not None and built[r.chosen if r.chosen >= 0 else len(built) - 1] == r.last.widths


def test_ratios_reproduce_the_widths_with_the_pruner():
    from compress.structured import pruner as structured
    from compress.search.latency_target import per_layer_block
    from compress.search.allocator import channel_groups
    from compress.structured.criteria import IMPORTANCES
    from compress.zoo import MODELS

    torch.manual_seed(0)
    m = MODELS.get("resnet20")(width=16).eval()
    ex = torch.randn(1, 3, 16, 16)
    imp = IMPORTANCES.get("l2").build()
    groups = channel_groups(m, ex, imp, ["fc"], round_to=8, min_floor=structured.Guards().floor, first_conv="conv1",
                            first_conv_max_ratio=0.5, max_ratio=0.9)
    widths = [g.widths[min(1, len(g.widths) - 1)] for g in groups]  # one step down everywhere
    block = per_layer_block(m, groups, ratios_for(groups, widths))
    structured.GuardedPruner(m, ex, imp, ratio=0.0, scope="per_layer", per_layer=block).step()
    mods = dict(m.named_modules())
    got = [mods[next(x for x in g.members if x.endswith(".out"))[:-4]].out_channels for g in groups]
    assert got == widths


def _latency_recipe(target: dict) -> dict:
    r = tiny_recipe()
    r["stages"] = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
                   {"kind": "prune", "importance": "l2", "target": target},
                   {"kind": "benchmark", "batch_sizes": [8], "iters": 20, "rounds": 2, "warmup": 2}]
    return r


def test_prune_to_a_latency_target_end_to_end(write_recipe, tmp_path, one_thread):
    from conftest import cli

    out = tmp_path / "run"
    res = cli("run", str(write_recipe(_latency_recipe({"latency": 0.7, "tolerance": 0.5, "refits": 1}))),
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    fit = json.loads((out / "stages" / "01-prune" / "latency_fit.json").read_text())
    # backend and batch size default to the benchmark stage's
    assert fit["table"]["key"]["backend"] == "onnxruntime" and fit["table"]["key"]["batch_size"] == 8
    assert fit["within_budget"] and fit["measured_ratio"] <= 0.7 * 1.5
    assert fit["attempts"] and all(a["dense_ms"] > 0 for a in fit["attempts"])
    assert any(w < fit["dense_widths"][g] for g, w in fit["widths"].items())


def test_prune_latency_target_it_cannot_meet_exits_3(write_recipe, tmp_path, one_thread):
    from conftest import cli

    out = tmp_path / "run"
    # 2 % of dense: the guards (min_channels, first conv, round_to) cannot get there
    res = cli("run", str(write_recipe(_latency_recipe({"latency": 0.02, "tolerance": 0.0, "refits": 1}))),
              "--out", str(out))
    assert res.returncode == 3, res.stderr
    assert "target latency 0.02 x dense" in res.stderr and "over the budget" in res.stderr and "by " in res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "stages" / "01-prune" / "DONE").exists()


def test_allocator_gives_back_what_an_overshooting_move_left_unused():
    # g1's channels are cheap per ms and go first (32 -> 8: 2.0 -> 1.7 ms); still over 1.2 ms, g0 jumps
    # its cliff (32 -> 8: -0.9 ms) and lands at 0.8 ms. g1's cut is no longer needed: given back (+0.3 ms)
    groups = [ChannelGroup("g0", 32, [32, 24, 16, 8], [0.1] * 32, ["x.out"]),
              ChannelGroup("g1", 32, [32, 24, 16, 8], [0.01] * 32, ["y.out"])]
    t0 = {32: 1.0, 24: 1.0, 16: 1.0, 8: 0.1}   # g0 only gets faster at 8 (a cliff)
    t1 = {32: 1.0, 24: 0.9, 16: 0.8, 8: 0.7}
    lat = LayerLatency({"x": (None, 0, 3, 32), "y": (None, 1, 3, 32)},
                       lambda n, ci, co: (t0 if n == "x" else t1)[co])
    alloc = allocate(groups, lat, 1.2)
    assert alloc.widths == [8, 32] and alloc.predicted_ms == pytest.approx(1.1)
    assert alloc.cost == pytest.approx(0.1 * 24)


def test_removal_costs_sum_over_the_layers_a_group_cuts_and_are_relative_to_its_width():
    from compress.search.allocator import removal_costs

    # a group cut in 4 layer sides (plus a BatchNorm, which is no layer side), scores 3 and 1: the
    # cheaper channel is a quarter of the importance (x 4 sides = 1; 2 channels left when it goes: x 1),
    # the other three quarters (x 4 = 3; 1 channel left: x 2)
    costs = removal_costs([3.0, 1.0], ["a.out", "bn", "b.in", "c.in", "d.out"])
    assert costs == pytest.approx([1.0, 6.0])
    # a 2-side group with 4 channels of equal score: a quarter of each of 2 layers, x 4/4, 4/3, 4/2, 4/1
    assert removal_costs([5.0] * 4, ["x.out", "y.in"]) == pytest.approx([0.5, 2 / 3, 1.0, 2.0])
    assert removal_costs([0.0, 0.0], ["x.out"]) == pytest.approx([0.5, 1.0])


def test_a_residual_stream_costs_what_all_its_layers_lose():
    """ResNet-20: the group of a stage's residual stream is cut in every block of the stage, so removing
    its channels must cost more than removing a block's inner channels (the mean-reduced criterion made
    them equal and the allocator emptied every residual stream first)."""
    from compress.search.allocator import channel_groups
    from compress.structured.criteria import IMPORTANCES
    from compress.zoo import MODELS

    torch.manual_seed(0)
    model = MODELS.get("resnet20")(num_classes=10).eval()
    groups = channel_groups(model, torch.randn(1, 3, 32, 32), IMPORTANCES.get("l2").build(), ["fc"], round_to=8,
                            min_floor=lambda d: 8, first_conv="conv1", first_conv_max_ratio=None, max_ratio=0.9)
    # the cost of halving each group (its cheapest half of the channels)
    total = {g.name: g.removal_cost(g.dense, g.dense // 2) for g in groups}
    inner = [n for n in total if n.endswith(".conv1") and n.startswith("layers.")]
    residual = [n for n in total if n not in inner]
    assert inner and residual and min(total[n] for n in residual) > max(total[n] for n in inner)
