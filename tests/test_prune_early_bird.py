"""``prune`` with ``when: early_bird``: train only until the BN-gamma channel mask settles, then
prune; the early-bird-trained net becomes the dense teacher and reference."""
from __future__ import annotations

import json

from compress.recipe import validate_data
from compress.pipeline.runner import run_recipe

from conftest import tiny_recipe


def test_early_bird_prune_stage(tmp_path, one_thread):
    r = tiny_recipe()
    r["stages"] = [
        {"kind": "prune", "when": "early_bird", "ratio": 0.5, "scope": "global",
         "early_bird": {"epochs": 12, "window": 3, "threshold": 0.2, "optimizer": {"lr": 0.1}}},
        {"kind": "finetune", "epochs": 1, "distill": {"alpha": 0.5, "temperature": 2.0}},
    ]
    recipe = validate_data(r)
    assert recipe.stages[0].importance == "bn_scale"  # Early-Bird ranks channels by |gamma|
    summary = run_recipe(recipe, tmp_path / "run")
    eb = summary["stages"][0]["early_bird"]
    assert eb["found_at_epoch"] is not None and eb["found_at_epoch"] <= 12
    assert len(eb["distances"]) == eb["found_at_epoch"]  # training stopped in the epoch it emerged
    # the reference is the early-bird-trained dense net, not the random init
    assert summary["dense"]["accuracy"] > 50
    dense_metrics = json.loads((tmp_path / "run" / "dense" / "metrics.json").read_text())
    assert dense_metrics["params"] == summary["stages"][0]["params_before"]
    assert summary["final"]["params"] < summary["dense"]["params"]
    assert summary["final"]["accuracy"] > 50


def test_explicit_importance_is_kept_with_early_bird():
    r = tiny_recipe()
    r["stages"] = [{"kind": "prune", "when": "early_bird", "importance": "l1"}]
    assert validate_data(r).stages[0].importance == "l1"
