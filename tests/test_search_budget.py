"""The search's budget is enforced on the measured model (a budget it cannot meet exits 3, in a real
CLI process, saying by how much), the allocator's solution is a candidate and the study's first trial,
and the Pareto plot puts every point on one latency scale (checked on the plotted data)."""
from __future__ import annotations

import json

import pytest

from conftest import cli, tiny_recipe

pytest.importorskip("optuna")


def _recipe(budget: float) -> dict:
    r = tiny_recipe(name="budget")
    r["model"]["kwargs"]["width"] = 32
    r["stages"] = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
                   {"kind": "search", "budget": budget, "budget_metric": "latency", "trials": 3, "top_k": 1,
                    "batch_size": 8, "grid": [0.5, 1.0], "proxy": {"bn_batches": 2, "val_size": 64},
                    "measure": {"warmup": 1, "iters": 10, "rounds": 2}, "latency_tolerance": 0.0,
                    "finetune": {"epochs": 1, "max_steps": 2, "distill": {"alpha": 0.7, "temperature": 4.0}}}]
    return r


def test_search_over_its_budget_exits_3_and_plots_one_scale(tmp_path, write_recipe, one_thread):
    out = tmp_path / "run"
    res = cli("-q", "search", str(write_recipe(_recipe(0.03))), "--out", str(out))
    # 3 % of dense latency: the guards (min_channels, the first conv, round_to) cannot get there
    assert res.returncode == 3, res.stderr
    assert "search: the chosen model" in res.stderr and "over its budget 0.03 x dense" in res.stderr
    assert "Traceback" not in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gates"]["passed"] is False
    s = summary["search"]
    assert s["within_budget"] is False and s["measured_ratio"] > 0.03
    names = [r["name"] for r in s["rows"]]
    assert "allocated" in names and any(n.startswith("searched") for n in names)
    allocated = next(r for r in s["rows"] if r["name"] == "allocated")
    assert allocated["allocator_attempts"] and allocated["group_ratios"]

    data = json.loads((out / "stages" / "01-search" / "search.json").read_text())
    plot, rows = data["plot"], {r["name"]: r for r in s["rows"]}
    assert plot["x_label"].startswith("latency / dense") and "per-layer latency table" in plot["x_label"]
    assert plot["budget"] == 0.03
    # every point is a fraction of dense: the trials' table ratio, the candidates' predicted ratio from
    # the same table (a searched candidate sits exactly on its trial), the measured ratio from one run
    trials = {t["number"]: t for t in data["trials"]}
    assert [[t["x"], t["proxy"]] for t in data["trials"]] == plot["trials"]
    dense = rows["dense"]
    for name, c in plot["candidates"].items():
        assert c["predicted"] == pytest.approx(rows[name]["predicted_ms"] / dense["predicted_ms"])
        assert c["measured"] == pytest.approx(rows[name]["measured_ms"] / dense["measured_ms"])
        if name.startswith("searched"):
            assert c["predicted"] == pytest.approx(trials[rows[name]["trial"]]["x"], rel=1e-6)
    assert all(0 < x <= 1.0 + 1e-9 for x, _ in plot["trials"])
