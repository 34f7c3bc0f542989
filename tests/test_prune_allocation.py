"""Ratio allocation: uniform / global / per_layer, MACs and params targets by bisection, iterative
steps with a fine-tune in between."""
from __future__ import annotations

import json

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.structured import pruner as pruning
from compress.metrics import count_macs, count_params
from compress.zoo import MODELS

from conftest import tiny_recipe

torch.set_num_threads(1)
SHAPE = (3, 16, 16)


def _resnet():
    torch.manual_seed(0)
    return MODELS.get("resnet20")(width=16).eval()


def _pruner(model, ratio, scope, **kw):
    return pruning.GuardedPruner(model, torch.randn(1, *SHAPE), tp.importance.GroupMagnitudeImportance(p=2),
                                 ratio=ratio, scope=scope, **kw)


def test_per_layer_ratios_hit_only_matching_groups():
    m = _resnet()
    _pruner(m, 0.0, "per_layer", per_layer={"layers.0.*": 0.5, "layers.4.conv1": 0.75}).step()
    assert m.layers[0].conv1.out_channels == 8          # 16 * (1 - 0.5)
    assert m.layers[4].conv1.out_channels == 8          # 32 * (1 - 0.75)
    assert m.layers[1].conv1.out_channels == 16         # unmatched: ratio 0
    assert m.layers[3].conv1.out_channels == 32
    assert m.conv1.out_channels == 8                    # the residual group layers.0.conv2 belongs to


def test_per_layer_pattern_that_matches_nothing_is_an_input_error():
    from compress.errors import InputError

    with pytest.raises(InputError, match="ratios: pattern 'blocks.0.*' matches no Conv/Linear"):
        _pruner(_resnet(), 0.0, "per_layer", per_layer={"blocks.0.*": 0.5})


def test_uniform_cuts_every_group_by_the_same_fraction():
    m = _resnet()
    _pruner(m, 0.5, "uniform", guards=pruning.Guards(first_conv_max_ratio=None)).step()
    for blk in m.layers:
        assert blk.conv1.out_channels * 2 == blk.conv2.in_channels * 2 == blk.conv1.weight.shape[0] * 2
    assert [m.layers[i].conv1.out_channels for i in (0, 3, 6)] == [8, 16, 32]


def test_global_ranks_across_groups():
    m = _resnet()
    # scores are normalised per group (mean), so what matters is the spread inside a group: a group
    # with four dominant filters has many weak ones globally; a group of equal filters has none
    with torch.no_grad():
        m.layers[3].conv1.weight[:4].mul_(100.0)
        w = m.layers[6].conv1.weight
        w.copy_(torch.sign(w) * w.abs().mean())
    _pruner(m, 0.5, "global", guards=pruning.Guards(first_conv_max_ratio=None, round_to=None),
            max_ratio=0.9).step()
    spread, flat = m.layers[3].conv1.out_channels / 32, m.layers[6].conv1.out_channels / 64
    assert spread < 0.5 and spread < flat - 0.2, (spread, flat)

    u = _resnet()
    _pruner(u, 0.5, "uniform", guards=pruning.Guards(first_conv_max_ratio=None, round_to=None)).step()
    assert u.layers[3].conv1.out_channels == 16 and u.layers[6].conv1.out_channels == 32


@pytest.mark.parametrize("key,goal", [("macs", 0.5), ("params", 0.4)])
def test_target_by_bisection(key, goal):
    m = _resnet()
    base = count_macs(m, SHAPE) if key == "macs" else count_params(m)
    measure = (lambda x: count_macs(x, SHAPE) / base) if key == "macs" else (lambda x: count_params(x) / base)
    ratio, trials = pruning.ratio_for_target(m, torch.randn(1, *SHAPE),
                                             lambda: tp.importance.GroupMagnitudeImportance(p=2), measure, goal,
                                             iters=6, scope="global", guards=pruning.Guards(), max_ratio=0.9)
    reached = [t for t in trials if t["kept"] <= goal]
    assert reached and min(t["ratio"] for t in reached) == pytest.approx(ratio)
    # the original model is untouched (trials prune copies); pruning it at that ratio gives the same value
    assert count_params(m) == count_params(_resnet())
    _pruner(m, ratio, "global", max_ratio=0.9).step()
    kept = measure(m)
    assert kept <= goal and kept == next(t["kept"] for t in trials if t["ratio"] == pytest.approx(ratio))
    assert kept > goal - 0.15  # the smallest ratio that reaches the goal, not an overshoot


def _run(write_recipe, tmp_path, prune: dict):
    """The real runner in-process (the CLI path is covered by the exit-code tests)."""
    from compress.progress import set_quiet
    from compress.recipe import load_recipe
    from compress.pipeline.runner import run_recipe

    set_quiet(True)
    r = tiny_recipe()
    r["stages"] = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}}, {"kind": "prune", **prune}]
    run_recipe(load_recipe(write_recipe(r)), tmp_path / "run")
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_stage_target_reported_exactly(write_recipe, tmp_path):
    s = _run(write_recipe, tmp_path, {"importance": "l2", "target": {"macs": 0.5}, "scope": "global"})
    stage = s["stages"][1]
    assert stage["macs_kept"] <= 0.5
    assert stage["target"]["achieved"]["macs"] == stage["macs_kept"] == stage["macs_after"] / stage["macs_before"]
    assert s["prune"]["target"] == {"macs": 0.5} and s["prune"]["ratio"] == stage["ratio"]
    assert stage["guards"]["bound"][0]["guard"] == "classifier"


def test_stage_iterative_steps_with_finetune_between(write_recipe, tmp_path):
    s = _run(write_recipe, tmp_path, {"ratio": 0.5, "scope": "uniform", "steps": 2,
                                      "finetune_between": {"epochs": 1, "optimizer": {"lr": 0.01}}})
    stage = s["stages"][1]
    assert stage["steps"] == 2 and len(stage["finetune_between"]) == 1
    assert stage["finetune_between"][0]["steps"] > 0
    assert stage["params_kept"] < 0.6


def test_target_with_per_layer_is_rejected(write_recipe):
    from compress.errors import InputError
    from compress.recipe import load_recipe

    r = tiny_recipe()
    r["stages"] = [{"kind": "prune", "scope": "per_layer", "ratios": {"conv*": 0.3}, "target": {"macs": 0.5}}]
    with pytest.raises(InputError, match=r"stages\[0\].*target needs scope uniform or global"):
        load_recipe(write_recipe(r))
    r["stages"] = [{"kind": "prune", "target": {"macs": 0.5, "params": 0.5}}]
    with pytest.raises(InputError, match="exactly one of macs or params"):
        load_recipe(write_recipe(r))


def test_unreachable_target_is_an_input_error():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    from compress.errors import InputError

    with pytest.raises(InputError, match="cannot reach"):
        pruning.ratio_for_target(m, torch.randn(1, *SHAPE), lambda: tp.importance.GroupMagnitudeImportance(),
                                 lambda x: count_params(x) / 1e9 + 0.9, 0.5, scope="global")


def test_stage_target_with_data_aware_criterion_and_steps(write_recipe, tmp_path):
    s = _run(write_recipe, tmp_path, {"importance": "taylor", "target": {"params": 0.4}, "steps": 2,
                                      "scope": "global", "calibration_batches": 2})
    stage = s["stages"][1]
    assert stage["params_kept"] <= 0.4 and stage["target"]["achieved"] == {"params": stage["params_kept"]}
    first, last = stage["target"]["steps"]
    assert first["goal"] == pytest.approx(0.7) and last["goal"] == pytest.approx(0.4)  # the budget in two shares
    assert stage["ratio"] == [first["ratio_found"], last["ratio_found"]]
    found = [t for t in last["trials"] if t["ratio"] == last["ratio_found"]]
    assert found and found[0]["kept"] == stage["params_kept"]  # the last trial predicted the real run


def test_example_recipe_validates():
    from conftest import REPO

    from compress.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / "prune_target.yaml")
    prune = r.stages[1]
    assert prune.target.key == "macs" and prune.steps == 2 and prune.resolved_guards() == pruning.Guards()


def test_same_seed_same_pruned_model():
    def pruned():
        m = _resnet()
        torch.manual_seed(3)
        pruning.GuardedPruner(m, torch.randn(1, *SHAPE), tp.importance.RandomImportance(), ratio=0.5,
                              scope="global", max_ratio=0.9).step()
        return m.state_dict()

    a, b = pruned(), pruned()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(v.numel() for v in a.values()) < 0.7 * sum(v.numel() for v in _resnet().state_dict().values())
