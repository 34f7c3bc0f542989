"""Pruning at initialisation (SNIP, GraSP, SynFlow): exact densities, the scores they rank by,
SynFlow's freedom from layer collapse, and the lottery stage's ``method:`` switch."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compress.lottery import experiment as lottery
from compress.sparsity.at_init import prune_at_init, snip_scores
from compress.zoo import lenet_300_100
from compress.sparsity import masks


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0):
    torch.manual_seed(seed)
    model = lenet_300_100(num_classes=10, in_channels=1, image_size=8)
    names = lottery.prunable_tensors(model)
    batches = [(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))) for _ in range(2)]
    return model, names, masks.current_masks(model, names), batches


def test_snip_ranks_by_abs_grad_times_weight():
    model, names, ones, batches = _setup()
    scores = snip_scores(model, names, batches)
    model.zero_grad()
    for xb, yb in batches:
        F.cross_entropy(model(xb), yb).backward()
    assert torch.allclose(scores["fc.weight"], (model.fc.weight.grad * model.fc.weight).abs())
    m = prune_at_init(model, ones, "snip", 0.1, batches)
    total = sum(v.numel() for v in ones.values())
    assert sum(int(v.sum()) for v in m.values()) == round(0.1 * total)
    flat_s = torch.cat([scores[n].flatten() for n in names])
    flat_m = torch.cat([m[n].flatten() for n in names])
    assert flat_s[flat_m > 0].min() >= flat_s[flat_m == 0].max()


@pytest.mark.parametrize("method", ["grasp", "synflow"])
def test_density_is_exact_and_deterministic(method):
    model, names, ones, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = prune_at_init(model, ones, method, 0.05, batches, input_shape=(1, 8, 8), iterations=20)
    b = prune_at_init(model, ones, method, 0.05, batches, input_shape=(1, 8, 8), iterations=20)
    total = sum(v.numel() for v in ones.values())
    assert sum(int(v.sum()) for v in a.values()) == round(0.05 * total)
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched


def test_synflow_avoids_layer_collapse_where_one_shot_magnitude_would_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    with torch.no_grad():
        model[5].weight.mul_(0.01)  # a layer of small weights: global magnitude removes it entirely
    names = lottery.prunable_tensors(model)
    ones = masks.current_masks(model, names)
    mag = lottery.magnitude_prune(model, ones, 1 - 0.02, scope="global")
    assert int(mag["5.weight"].sum()) == 0
    syn = prune_at_init(model, ones, "synflow", 0.02, input_shape=(1, 8, 8), iterations=50)
    assert all(int(syn[n].sum()) > 0 for n in names)


def test_stage_method_snip_trains_masks_from_init(tmp_path):
    from compress.progress import set_quiet
    from compress.recipe import validate_data
    from compress.pipeline.runner import run_recipe

    set_quiet(True)
    recipe = {"name": "pai", "seed": 0, "device": "cpu",
              "model": {"factory": "lenet_300_100", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8},
                        "input_shape": [1, 8, 8]},
              "data": {"dataset": "digits", "batch_size": 32},
              "stages": [{"kind": "lottery", "rounds": 2, "mode": "one_shot", "method": "snip", "init_batches": 2,
                          "train": {"iterations": 20, "eval_every": 10, "validation": 200, "batch_size": 32}}]}
    s = run_recipe(validate_data(recipe), tmp_path / "run")
    rows = s["lottery"]["rows"]
    assert [(r["level"], r["variant"]) for r in rows] == [(0, "snip"), (2, "snip")]
    assert rows[1]["percent_remaining"] == pytest.approx(64.0, abs=0.01)
