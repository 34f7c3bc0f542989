"""Lottery tickets: mask arithmetic, exact resume of training from a captured state (late
rewinding), the stage end to end through the CLI, and level-by-level resume after a real SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset
from torch import nn

from compress.train.config import OptimizerConfig, TrainLoopConfig
from compress.lottery import experiment as lottery
from compress.sparsity import masks
from compress.train.loop import train
from compress.zoo import lenet_300_100

from conftest import REPO, cli


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lenet_300_100(num_classes=10, in_channels=1, image_size=8)


# ---------------------------------------------------------------------------------------------
# masks

def test_per_layer_rates_prune_fraction_of_remaining_smallest_weights():
    model = _mlp()
    names = lottery.prunable_tensors(model)
    assert names == ["features.1.weight", "features.3.weight", "fc.weight"]
    m0 = masks.current_masks(model, names)
    m1 = lottery.magnitude_prune(model, m0, 0.2, {"fc": 0.1})
    assert int(m1["features.1.weight"].sum()) == round(0.8 * 64 * 300)
    assert int(m1["fc.weight"].sum()) == round(0.9 * 1000)
    w = model.features[1].weight.detach().abs()
    kept, dropped = w[m1["features.1.weight"] > 0], w[m1["features.1.weight"] == 0]
    assert kept.min() >= dropped.max()  # magnitude: every kept weight is at least as large as any pruned one

    # round 2 removes 20 % of what *remains*, and never revives a pruned weight
    masks.set_masks(model, m1)
    m2 = lottery.magnitude_prune(model, m1, 0.2, {"fc": 0.1})
    assert int(m2["features.1.weight"].sum()) == round(0.8 * int(m1["features.1.weight"].sum()))
    assert bool((m2["features.1.weight"] <= m1["features.1.weight"]).all())

    # one-shot to the density 2 rounds reach
    one = lottery.magnitude_prune(_mlp(), m0, 0.2, {"fc": 0.1}, rounds=2)
    assert int(one["features.1.weight"].sum()) == round(64 * 300 * 0.64)
    assert int(one["fc.weight"].sum()) == round(1000 * 0.81)


def test_global_scope_with_ignore_ranks_all_tensors_together():
    model = _mlp()
    names = lottery.prunable_tensors(model, ignore=["fc"])
    assert "fc.weight" not in names
    with torch.no_grad():
        w = model.features[1].weight
        w.copy_(w.sign() * (w.abs() + 1.0))  # every first-layer weight now outranks every other one
    m = lottery.magnitude_prune(model, masks.current_masks(model, names), 0.5, scope="global")
    total = 64 * 300 + 300 * 100
    assert sum(int(v.sum()) for v in m.values()) == round(total * 0.5)
    assert float(m["features.1.weight"].mean()) == 1.0  # global ranking kept the large layer whole


def test_random_masks_keep_per_layer_density_but_move_positions():
    model = _mlp()
    names = lottery.prunable_tensors(model)
    m = lottery.magnitude_prune(model, masks.current_masks(model, names), 0.6, {"fc": 0.3})
    r = masks.random_masks_like(m, seed=3)
    assert all(int(r[n].sum()) == int(m[n].sum()) for n in names)
    assert not torch.equal(r["features.1.weight"], m["features.1.weight"])
    assert torch.equal(r["fc.weight"], masks.random_masks_like(m, seed=3)["fc.weight"])  # seeded


# ---------------------------------------------------------------------------------------------
# late rewinding: resuming train() at step k from the captured state is exact

def test_train_resumed_from_captured_state_matches_uninterrupted_run():
    torch.manual_seed(0)
    x, y = torch.randn(300, 1, 8, 8), torch.randint(0, 10, (300,))
    cfg = TrainLoopConfig(epochs=0, max_steps=25, optimizer=OptimizerConfig(name="adam", lr=1e-3, schedule="cosine"))

    def fresh():  # the same init and the same 50 % magnitude masks
        m = _mlp(1)
        names = lottery.prunable_tensors(m)
        masks.set_masks(m, lottery.magnitude_prune(m, masks.current_masks(m, names), 0.5))
        return m

    full = fresh()
    captured = []
    train(full, lottery.ShuffledBatches(TensorDataset(x, y), 32, seed=5), cfg,
          on_step=lambda s, m, o: captured.append(lottery.RewindState.capture(s, m, o)) if s == 11 else None)
    state = captured[0]
    resumed = fresh()
    resumed.load_state_dict({**resumed.state_dict(), **state.weights})
    res = train(resumed, lottery.ShuffledBatches(TensorDataset(x, y), 32, seed=5), cfg, start_step=state.step,
                optimizer_state=state.optimizer)
    assert res.steps == 25
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert float(full.features[1].weight_mask.mean()) == 0.5
    assert bool((full.features[1].weight[full.features[1].weight_mask == 0] == 0).all())


# ---------------------------------------------------------------------------------------------
# the stage through the CLI

def _recipe(**stage) -> dict:
    st = {"kind": "lottery", "rounds": 2, "rates": {"fc": 0.1},
          "train": {"iterations": 40, "eval_every": 10, "validation": 200, "batch_size": 32}}
    st.update(stage)
    return {"name": "lth", "seed": 0, "device": "cpu",
            "model": {"factory": "lenet_300_100", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8},
                      "input_shape": [1, 8, 8]},
            "data": {"dataset": "digits", "batch_size": 32},
            "stages": [st], "gates": {}}


def _run(recipe: dict, out: Path) -> dict:
    """In-process run (the CLI path is exercised by the resume and error tests)."""
    from compress.progress import set_quiet
    from compress.recipe import validate_data
    from compress.pipeline.runner import run_recipe

    set_quiet(True)
    return run_recipe(validate_data(recipe), out)


def test_stage_iterative_with_controls_and_late_rewind(tmp_path):
    out = tmp_path / "run"
    s = _run(_recipe(controls=["random_reinit", "random_prune"], rewind={"iterations": 10}), out)
    rows = s["lottery"]["rows"]
    assert [(x["level"], x["variant"]) for x in rows] == [
        (0, "imp"), (1, "imp"), (1, "random_reinit"), (1, "random_prune"),
        (2, "imp"), (2, "random_reinit"), (2, "random_prune")]
    hidden, out_layer = 64 * 300 + 300 * 100, 1000
    expect = 100 * (round(round(64 * 300 * .8) * .8) + round(round(30000 * .8) * .8) + round(round(900 * .9)))
    assert rows[4]["percent_remaining"] == pytest.approx(expect / (hidden + out_layer), abs=1e-3)
    for x in rows:
        assert x["early_stop_iteration"] in {10, 20, 30, 40} and 0 < x["early_stop_test_accuracy"] <= 100
        assert x["final_iteration"] == 40
    rewind = torch.load(out / "lottery" / "00" / "rewind.pt", weights_only=True)
    assert rewind["step"] == 10 and rewind["optimizer"]["state"]  # Adam moments at step 10
    # IMP levels after rewinding train from iteration 10: their first evaluation is at 20
    level1 = json.loads((out / "lottery" / "00" / "level-01-imp.json").read_text())
    assert level1["history"][0]["iteration"] == 20
    assert (out / "lottery-00.png").stat().st_size > 10_000
    # the final model is the masked ticket at the last level; masked weights are exactly zero
    from compress.api import load

    ticket = load(out)
    assert masks.has_masks(ticket)
    d = masks.density(ticket)
    assert d["features.1.weight"] == pytest.approx(0.64, abs=1e-3) and d["fc.weight"] == pytest.approx(0.81, abs=1e-3)
    w, m = ticket.features[1].weight, ticket.features[1].weight_mask
    assert bool((w[m == 0] == 0).all())


def test_stage_one_shot_reaches_same_density_in_one_step(tmp_path):
    s = _run(_recipe(mode="one_shot", rounds=3, scope="global", rates={}, ignore=["fc"]), tmp_path / "run")
    rows = s["lottery"]["rows"]
    assert [x["level"] for x in rows] == [0, 3]
    assert rows[1]["percent_remaining"] == pytest.approx(51.2, abs=0.01)


def test_bad_config_is_a_one_line_input_error(write_recipe, tmp_path):
    r = cli("run", str(write_recipe(_recipe(rates={"fc": 1.5}))), "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "stages[0]" in r.stderr and "rates" in r.stderr and "Traceback" not in r.stderr
    from compress.errors import InputError
    from compress.recipe import validate_data

    with pytest.raises(InputError, match="control_rounds"):
        validate_data(_recipe(controls=["random_prune"], control_rounds=[5]))
    with pytest.raises(InputError, match="iterations or epochs"):
        validate_data(_recipe(train={"iterations": 10, "epochs": 1}))


def test_sigkill_mid_run_resumes_at_next_unfinished_level(tmp_path, write_recipe):
    data = _recipe(rounds=4, controls=["random_prune"], control_rounds=[2, 4],
                   train={"iterations": 60, "eval_every": 20, "validation": 200, "batch_size": 32})
    recipe = write_recipe(data)
    work = tmp_path / "killed" / "lottery" / "00"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "--quiet", "run", str(recipe), "--out",
                             str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (work / "level-01-imp.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in work.glob("level-*.json")}
    assert "level-01-imp.json" in done_before and "level-04-imp.json" not in done_before
    assert not (tmp_path / "killed" / "summary.json").exists()

    r = cli("--quiet", "run", str(recipe), "--out", str(tmp_path / "killed"), "--resume")
    assert r.returncode == 0, r.stderr
    # finished levels were not trained again
    assert all((work / n).stat().st_mtime_ns == t for n, t in done_before.items())
    _run(data, tmp_path / "straight")

    def rows(d):
        return [{k: v for k, v in x.items() if k != "seconds"}
                for x in json.loads((d / "summary.json").read_text())["lottery"]["rows"]]

    assert rows(tmp_path / "killed") == rows(tmp_path / "straight")  # the resumed run is the same experiment
    assert len(rows(tmp_path / "straight")) == 5 + 2
