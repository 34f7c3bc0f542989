"""Latency-aware per-layer search: the latency table (cache, keys), the predictor against real ONNX
Runtime measurements, the search stage end to end (valid per_layer block that the prune stage
accepts and that meets the budget), a resumable SQLite study, and bad config -> exit 2."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from compress.search.latency_table import LatencyPredictor, LatencyTable
from compress.search.candidates import Pruner, bisect_ratio, measure_models
from compress.errors import InputError
from compress.recipe import validate_data
from compress.zoo import small_cnn

from conftest import cli, tiny_recipe

SHAPE = (1, 16, 16)


def _model():
    torch.manual_seed(0)
    return small_cnn(num_classes=10, in_channels=1, width=32).eval()


def test_table_is_cached_and_keyed(tmp_path):
    path = tmp_path / "latency_table.json"
    model = _model()
    pr = Pruner(model, SHAPE)
    t1 = LatencyTable(path, "onnxruntime", batch_size=1, threads=1, target_s=0.01)
    p1 = LatencyPredictor(model, SHAPE, t1, pr.prunable, (0.5, 1.0))
    n = p1.warm(model)
    assert n > 0 and path.exists()
    saved = json.loads(path.read_text())
    assert list(saved) == [t1.key_id]
    assert saved[t1.key_id]["key"]["backend"] == "onnxruntime" and saved[t1.key_id]["key"]["batch_size"] == 1
    assert saved[t1.key_id]["key"]["cpu"] and saved[t1.key_id]["key"]["threads"] == 1
    # a second table object on the same file measures nothing
    t2 = LatencyTable(path, "onnxruntime", batch_size=1, threads=1, target_s=0.01)
    assert LatencyPredictor(model, SHAPE, t2, pr.prunable, (0.5, 1.0)).warm(model) == 0
    assert t2.layers == t1.layers
    # another batch size is another key in the same file, measured afresh
    t3 = LatencyTable(path, "onnxruntime", batch_size=4, threads=1, target_s=0.01)
    assert t3.key_id != t1.key_id
    assert LatencyPredictor(model, SHAPE, t3, pr.prunable, (0.5, 1.0)).warm(model) > 0
    assert len(json.loads(path.read_text())) == 2


def test_predictor_tracks_measured_latency(tmp_path):
    model = _model()
    shape = (1, 28, 28)
    pr = Pruner(model, shape)
    table = LatencyTable(tmp_path / "t.json", batch_size=8, target_s=0.02)
    pred = LatencyPredictor(model, shape, table, pr.prunable, (0.25, 0.5, 0.75, 1.0))
    pred.warm(model)
    small = pr.prune("uniform", 0.75)
    t = measure_models({"dense": model, "small": small}, shape, tmp_path, "onnxruntime", 8, 1, 3, 40, 4)
    pred.calibrate(model, t["dense"]["p50"])
    p_small = pred.predict(small)
    # loose: a shared 2-core machine; the point is the model sees the speed-up, not 1 % accuracy
    assert p_small < pred.predict(model)
    assert abs(p_small - t["small"]["p50"]) / t["small"]["p50"] < 0.75


def _search_recipe(**search):
    r = tiny_recipe(name="srch")
    stage = {"kind": "search", "budget": 0.6, "trials": 3, "top_k": 1, "grid": [0.5, 1.0], "batch_size": 8,
             "proxy": {"bn_batches": 2, "val_size": 64}, "measure": {"warmup": 1, "iters": 10, "rounds": 2},
             "finetune": {"epochs": 1, "max_steps": 3, "distill": {"alpha": 0.7, "temperature": 4.0}},
             "budget_metric": "macs"}
    stage.update(search)
    r["model"]["kwargs"]["width"] = 32
    r["stages"] = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}}, stage]
    return r


def test_search_block_is_a_valid_prune_stage_and_study_resumes(tmp_path, write_recipe, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores: oversubscribed torch threads are 10x slower
    rec = write_recipe(_search_recipe())
    out = tmp_path / "run"
    res = cli("-q", "search", str(rec), "--out", str(out))
    assert res.returncode == 0, res.stderr
    sdir = out / "stages" / "01-search"
    summary = json.loads((out / "summary.json").read_text())["search"]
    assert summary["trials_total"] == 3
    assert (sdir / "pareto.png").stat().st_size > 1000 and (sdir / "comparison.md").exists()
    assert (out / "search.db").exists() and (out / "latency_table.json").exists()
    names = [r["name"] for r in summary["rows"]]
    assert names[:3] == ["dense", "uniform", "global"] and any(n.startswith("searched") for n in names)
    chosen = next(r for r in summary["rows"] if r["name"] == summary["chosen"])
    assert chosen["macs"] <= summary["budget"]

    # the pasted block: a recipe whose prune stage is the searched block is accepted and meets the budget
    block = yaml.safe_load((sdir / "prune_block.yaml").read_text())[0]
    assert block["scope"] == "per_layer" and block["ratios"]
    r2 = tiny_recipe(name="paste")
    r2["model"]["kwargs"]["width"] = 32
    r2["stages"] = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}}, block]
    res2 = cli("-q", "run", str(write_recipe(r2, "paste.yaml")), "--out", str(tmp_path / "paste"))
    assert res2.returncode == 0, res2.stderr
    final = json.loads((tmp_path / "paste" / "summary.json").read_text())["final"]
    assert final["macs"] == chosen["macs"] <= summary["budget"]

    # re-running continues the SQLite study: the trial count accumulates
    res3 = cli("-q", "search", str(rec), "--out", str(out), "--trials", "2", "--workers", "2")
    assert res3.returncode == 0, res3.stderr
    again = json.loads((out / "summary.json").read_text())["search"]
    assert again["trials_total"] == 5 and again["trials_added"] == 2
    assert again["table"]["measured_now"] == 0  # the latency table came from the cache


def test_bad_search_config_exits_2(tmp_path, write_recipe, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = cli("search", str(write_recipe(_search_recipe(budget=1.5))), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "stages[1].budget" in res.stderr and "Traceback" not in res.stderr
    res = cli("search", str(write_recipe(tiny_recipe(), "d.yaml")), "--out", str(tmp_path / "y"))
    assert res.returncode == 2 and "no stage of kind 'search'" in res.stderr
    # the other field checks, in process (same InputError path the CLI maps to exit 2)
    for bad, msg in (({"backend": "nope"}, "unknown benchmark backend"), ({"storage": "search.db"}, "RDB URL"),
                     ({"grid": [0.0, 1.0]}, "width fractions"), ({"objective": "fastest"}, "objective")):
        with pytest.raises(InputError) as exc:
            validate_data(_search_recipe(**bad))
        assert msg in str(exc.value) and str(exc.value).startswith("stages[1].")


def test_bisect_finds_the_smallest_feasible_ratio_despite_a_non_monotone_top():
    # cost falls with the ratio, then jumps back up above 0.85 (round_to emptying a group)
    def cost(r):
        return 10.0 if r > 0.85 else 1.0 - r

    r, c = bisect_ratio(cost, 0.5, hi=0.9)
    assert 0.5 <= r <= 0.5 + 0.1 / 16 + 1e-9 and c <= 0.5
    r, c = bisect_ratio(cost, 0.01, hi=0.9)  # infeasible: the cheapest point seen
    assert c == min(cost(x / 10) for x in range(10))


@pytest.mark.tensorrt
def test_table_measures_on_tensorrt(tmp_path):
    from compress.deploy.backends import BACKENDS
    from compress.deploy.timing import BackendUnavailable

    if "tensorrt" not in BACKENDS:
        pytest.skip("no 'tensorrt' backend registered in this build")
    model = _model()
    pr = Pruner(model, SHAPE)
    table = LatencyTable(tmp_path / "t.json", "tensorrt", batch_size=1, target_s=0.01)
    try:
        n = LatencyPredictor(model, SHAPE, table, pr.prunable, (0.5, 1.0)).warm(model)
    except BackendUnavailable as exc:
        pytest.skip(f"TensorRT unavailable here: {exc}")
    assert n > 0 and table.key["backend"] == "tensorrt"
