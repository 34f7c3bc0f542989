"""Gates and checks that must fail when they should (issue 13): default gates that are real and
reported, NaN/Inf (gates, training, summary.json), an absolute accuracy floor and the at-chance
check, ``compress check-sparsity`` (N:M = at most N non-zeros per M, ``--require``), prunes that
remove nothing, and a search that misses its measured budget. Exit codes are asserted through the
real CLI, with no traceback."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from compress.deploy.onnx_io import check_sparsity, export_onnx
from compress.errors import InputError
from compress.io import atomic_write_json, json_safe
from compress.pipeline.gates import chance_level, check_gates
from compress.recipe import Gates, validate_data
from compress.sparsity.n_m import is_n_m_sparse, n_m_check, n_m_mask, parse_pattern
from compress.sparsity.sparsegpt import prune_matrix

from conftest import cli, tiny_recipe


def _strict_json(text: str):
    """Parse as a strict reader would: a bare NaN/Infinity is an error."""
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _no_traceback(res):
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr


def _small(**over) -> dict:
    """A quick recipe: a few training steps of the tiny CNN, no gates set (the defaults apply)."""
    r = tiny_recipe(gates={})
    r["stages"] = [{"kind": "train", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1}}]
    r.update(over)
    return r


# ---------------------------------------------------------------------------------------------
# 1. default gates: real, documented, reported


def test_gate_defaults_and_explicit_vs_default_parity():
    g = Gates()
    assert g.max_accuracy_drop == 1.0 and g.max_parity_error == 1e-4
    assert g.min_accuracy is None and g.min_speedup is None and g.max_int8_accuracy_drop is None
    # no export: the default parity gate resolves to null (not applicable), the recipe stays valid
    r = validate_data(_small())
    assert r.gates.max_parity_error is None and "max_parity_error" not in r.gates.model_fields_set
    again = validate_data(r.model_dump(mode="json"))  # the resolved recipe.yaml validates again
    assert again.gates.max_parity_error is None
    res = check_gates(r, {"accuracy": 98.0}, {"accuracy": 97.5}, {})
    assert res["passed"] and res["skipped"]["max_parity_error"].startswith("not applicable")
    # explicit without an export: an input error naming the gate; explicit null: fine
    with pytest.raises(InputError) as ei:
        validate_data(_small(gates={"max_parity_error": 1e-4}))
    assert ei.value.field == "gates.max_parity_error"
    assert validate_data(_small(gates={"max_parity_error": None})).gates.max_parity_error is None
    # with an export the default is on
    assert validate_data(tiny_recipe()).gates.max_parity_error == 1e-4
    # a NaN limit is refused (it would make every comparison pass)
    with pytest.raises(InputError) as ei:
        validate_data(_small(gates={"max_accuracy_drop": float("nan")}))
    assert ei.value.field == "gates.max_accuracy_drop"


def test_default_accuracy_gate_fails_a_run_and_the_report_says_what_was_checked(write_recipe, tmp_path, one_thread):
    r = _small()
    # prune half the channels with no fine-tune: far more than 1 pp lost
    r["stages"].append({"kind": "prune", "ratio": 0.5, "scope": "uniform"})
    out = tmp_path / "run"
    res = cli("-q", "run", str(write_recipe(r)), "--out", str(out))
    assert res.returncode == 3, res.stderr
    _no_traceback(res)
    assert "max_accuracy_drop" in res.stderr
    s = _strict_json((out / "summary.json").read_text())
    g = s["gates"]
    assert s["status"] == "gates_failed" and not g["passed"]
    row = next(x for x in g["results"] if x["gate"] == "max_accuracy_drop" and x["rule"] == "<=")
    assert row["limit"] == 1.0 and row["value"] == pytest.approx(s["dense"]["accuracy"] - s["final"]["accuracy"])
    assert row["value"] > 1.0 and not row["passed"]
    assert g["skipped"]["max_parity_error"].startswith("not applicable")
    assert set(g["skipped"]) == {"max_parity_error", "min_accuracy", "min_speedup", "max_int8_accuracy_drop"}
    report = (out / "report.md").read_text()
    assert "## Gates" in report and "| max_accuracy_drop" in report and "**failed**" in report
    assert "Not checked:" in report and "- max_parity_error: not applicable" in report
    assert yaml.safe_load((out / "recipe.yaml").read_text())["gates"]["max_accuracy_drop"] == 1.0


# ---------------------------------------------------------------------------------------------
# 2. NaN and Inf: gates fail, training stops (exit 5), summary.json stays valid JSON


def test_a_nan_value_fails_every_gate():
    gates = Gates(max_accuracy_drop=1.0, min_accuracy=50.0, min_speedup=1.0, max_parity_error=1e-4,
                  max_int8_accuracy_drop=1.0)
    recipe = SimpleNamespace(gates=gates)
    nan = float("nan")
    res = check_gates(recipe, {"accuracy": nan}, {"accuracy": 90.0},
                      {"export": {"parity_max_abs_error": nan, "int8_accuracy": nan},
                       "benchmark": [{"backend": "onnxruntime", "batch_size": 1, "speedup": nan}]})
    assert not res["passed"]
    failed = {x["gate"] for x in res["results"] if not x["passed"]}
    assert failed == {"max_accuracy_drop", "min_speedup", "max_parity_error", "max_int8_accuracy_drop"}
    assert all("not a number" in f for f in res["failures"])
    # values read back from summary.json ("NaN" strings) fail too
    res = check_gates(recipe, {"accuracy": 90.0}, {"accuracy": 90.0}, {"export": {"parity_max_abs_error": "NaN"}})
    assert any("parity error nan" in f and "not a number" in f for f in res["failures"])
    inf = check_gates(recipe, {"accuracy": 90.0}, {"accuracy": 90.0}, {"export": {"parity_max_abs_error": math.inf}})
    assert not inf["passed"]


def test_json_files_never_hold_bare_nan(tmp_path):
    obj = {"a": float("nan"), "b": [math.inf, -math.inf, 1.5], "t": torch.tensor([1.0, float("nan")]),
           "n": np.float32("nan"), "i": np.int64(3)}
    assert json_safe(obj) == {"a": "NaN", "b": ["Infinity", "-Infinity", 1.5], "t": [1.0, "NaN"], "n": "NaN", "i": 3}
    atomic_write_json(tmp_path / "x.json", obj)
    assert _strict_json((tmp_path / "x.json").read_text())["a"] == "NaN"


def test_infinite_learning_rate_is_refused_before_training(write_recipe, tmp_path):
    """A non-finite float in the recipe never reaches training: exit 2 naming the field."""
    text = yaml.safe_dump(_small(), sort_keys=False).replace("lr: 0.1", "lr: .inf")
    res = cli("-q", "run", str(write_recipe(text)), "--out", str(tmp_path / "run"))
    assert res.returncode == 2, (res.returncode, res.stderr)
    _no_traceback(res)
    assert res.stderr.startswith("error: stages[0].optimizer.lr: ") and "finite" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lr", ["1.0e+30", "1.0e+38"])
def test_nan_or_inf_loss_stops_training_with_exit_5(write_recipe, tmp_path, lr, one_thread):
    text = yaml.safe_dump(_small(), sort_keys=False).replace("lr: 0.1", f"lr: {lr}")
    assert f"lr: {lr}" in text
    res = cli("-q", "run", str(write_recipe(text)), "--out", str(tmp_path / "run"))
    assert res.returncode == 5, (res.returncode, res.stderr)
    _no_traceback(res)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: stages[0] (train):")
    assert "loss is" in err and "at step" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_checkpoint_with_nan_weights_is_refused(write_recipe, tmp_path):
    from safetensors.torch import save_file

    from compress.model_io import build_model

    r = _small()
    model = build_model(r["model"]["factory"], r["model"]["kwargs"])
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    first = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() > 1)
    sd[first][0] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_file(sd, str(ckpt))
    r["model"]["checkpoint"] = str(ckpt)
    res = cli("-q", "run", str(write_recipe(r)), "--out", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    _no_traceback(res)
    assert "model.checkpoint" in res.stderr and first in res.stderr and "NaN or infinite" in res.stderr


NAN_MODEL = '''
import torch
from torch import nn


class NanNet(nn.Module):
    """Finite weights, NaN outputs."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def build(num_classes=10):
    return NanNet(num_classes)
'''


def test_nan_outputs_fail_the_gates_and_the_summary_stays_valid_json(tmp_path):
    (tmp_path / "nanmodel.py").write_text(NAN_MODEL)
    r = tiny_recipe(gates={})
    r["model"] = {"factory": "nanmodel:build", "kwargs": {"num_classes": 10}, "input_shape": [1, 8, 8]}
    r["stages"] = [{"kind": "export", "parity_samples": 16}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    res = cli("-q", "run", "recipe.yaml", "--out", "run", cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    _no_traceback(res)
    assert "max_parity_error" in res.stderr and "not a number" in res.stderr
    text = (tmp_path / "run" / "summary.json").read_text()
    s = _strict_json(text)  # no bare NaN anywhere
    assert s["export"]["parity_max_abs_error"] == "NaN" and s["dense"]["loss"] == "NaN"
    assert s["status"] == "gates_failed"
    assert _strict_json((tmp_path / "run" / "stages" / "00-export" / "result.json").read_text())
    assert "NaN" in (tmp_path / "run" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# 3. an absolute floor and the at-chance check


def test_min_accuracy_and_chance_level_unit():
    assert chance_level(torch.tensor([0, 1, 2, 3]), 4) == 25.0
    assert chance_level(torch.tensor([0, 0, 0, 1]), 4) == 75.0  # always predicting the commonest label
    recipe = SimpleNamespace(gates=Gates(min_accuracy=90.0))
    ok = check_gates(recipe, {"accuracy": 95.0}, {"accuracy": 94.5}, {}, chance=10.0)
    assert ok["passed"] and not ok["warnings"]
    low = check_gates(recipe, {"accuracy": 89.5}, {"accuracy": 89.0}, {}, chance=10.0)
    assert not low["passed"] and low["failures"] == ["final accuracy 89.00% < min_accuracy 90.0%"]
    # dense and final equally bad, at chance: the drop is 0, the run still fails, with a warning
    bad = check_gates(SimpleNamespace(gates=Gates()), {"accuracy": 10.3}, {"accuracy": 10.3}, {}, chance=10.28)
    assert not bad["passed"] and "at chance level" in bad["failures"][0]
    assert bad["warnings"] and "at chance level" in bad["warnings"][0]
    # switching the accuracy gate off judges no accuracy (the warning stays)
    off = check_gates(SimpleNamespace(gates=Gates(max_accuracy_drop=None)), {"accuracy": 10.3}, {"accuracy": 10.3},
                      {}, chance=10.28)
    assert off["passed"] and off["warnings"] and off["skipped"]["max_accuracy_drop"].startswith("off")


def test_model_trained_to_chance_does_not_pass(write_recipe, tmp_path, one_thread):
    text = yaml.safe_dump(_small(), sort_keys=False).replace("lr: 0.1", "lr: 100000")
    out = tmp_path / "run"
    res = cli("-q", "run", str(write_recipe(text)), "--out", str(out))
    # either the loss blows up (exit 5) or the net collapses to a constant prediction (exit 3)
    assert res.returncode in (3, 5), res.stderr
    _no_traceback(res)
    if res.returncode == 3:
        assert "at chance level" in res.stderr and "warning: the dense model scores" in res.stderr
        s = _strict_json((out / "summary.json").read_text())
        assert s["status"] == "gates_failed" and s["gates"]["warnings"]
        assert "warning: the dense model" in (out / "report.md").read_text()
    else:
        assert "stages[0] (train)" in res.stderr


def test_min_accuracy_gate_through_the_cli(write_recipe, tmp_path, one_thread):
    r = _small(gates={"min_accuracy": 99.99, "max_accuracy_drop": None})
    out = tmp_path / "run"
    res = cli("-q", "run", str(write_recipe(r)), "--out", str(out))
    assert res.returncode == 3, res.stderr
    _no_traceback(res)
    assert "min_accuracy 99.99" in res.stderr
    s = _strict_json((out / "summary.json").read_text())
    row = next(x for x in s["gates"]["results"] if x["gate"] == "min_accuracy")
    assert row["limit"] == 99.99 and row["value"] == s["final"]["accuracy"] and not row["passed"]


# ---------------------------------------------------------------------------------------------
# 4. N:M means at most N non-zeros in every M; check-sparsity --pattern / --require


def test_n_m_convention_everywhere():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("1:4") == (1, 4) and parse_pattern("4:8") == (4, 8)
    for bad in ("0:4", "5:4", "4:4", "2-4", "a:b", "2:4:8"):
        with pytest.raises(ValueError):
            parse_pattern(bad)
    torch.manual_seed(0)
    w = torch.randn(8, 16) + 5  # no zeros
    for n, m in ((1, 4), (2, 4), (4, 8)):
        mask = n_m_mask(w, n, m)
        assert int(mask.sum()) == 8 * 16 * n // m  # n kept per group of m
        assert is_n_m_sparse(w * mask, axis=1, n=n, m=m)
    one_four, two_four = w * n_m_mask(w, 1, 4), w * n_m_mask(w, 2, 4)
    assert is_n_m_sparse(one_four, axis=1, n=2, m=4)        # 1 non-zero of 4 also holds 2:4
    assert not is_n_m_sparse(two_four, axis=1, n=1, m=4)    # "at least 1 zero" would have said yes
    assert n_m_check(two_four.numpy(), 1, 1, 4) == (False, 0.0)
    # SparseGPT follows the same convention
    _, pm = prune_matrix(w.clone(), torch.eye(16), 1, 4, block=8, damp=1e-9)
    assert torch.equal(pm, n_m_mask(w, 1, 4))
    # the sparsify stage's pattern too
    st = validate_data({**tiny_recipe(), "stages": [{"kind": "sparsify", "pattern": "1:4"}]}).stages[0]
    assert st.n_m == (1, 4)
    with pytest.raises(InputError) as ei:
        validate_data({**tiny_recipe(), "stages": [{"kind": "sparsify", "pattern": "5:4"}]})
    assert ei.value.field == "stages[0].pattern" and "0 < N < M" in str(ei.value)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _exported(tmp_path, name: str, n: int, m: int, layers=("conv", "fc1", "fc2")):
    torch.manual_seed(1)
    net = _Net().eval()
    with torch.no_grad():
        for layer in layers:
            mod = getattr(net, layer)
            mod.weight.mul_(n_m_mask(mod.weight, n, m))
    return export_onnx(net, (8, 4, 4), tmp_path / name)


def test_check_sparsity_on_real_exports(tmp_path):
    f14, f48, f24 = _exported(tmp_path, "14.onnx", 1, 4), _exported(tmp_path, "48.onnx", 4, 8), \
        _exported(tmp_path, "24.onnx", 2, 4)
    held = {(f.name, p): check_sparsity(f, *parse_pattern(p))["sparse_layers"]
            for f in (f14, f48, f24) for p in ("1:4", "2:4", "4:8")}
    assert held[("14.onnx", "1:4")] == held[("14.onnx", "2:4")] == held[("14.onnx", "4:8")] == 3
    assert held[("48.onnx", "4:8")] == 3 and held[("48.onnx", "1:4")] == 0
    assert held[("24.onnx", "2:4")] == held[("24.onnx", "4:8")] == 3 and held[("24.onnx", "1:4")] == 0
    rep = check_sparsity(f14, 1, 4)
    assert rep["pattern"] == "1:4" and rep["eligible_layers"] == rep["total_layers"] == 3
    assert all(x["holds_pattern"] and x["sparse_2_4"] for x in rep["layers"])
    rep = check_sparsity(f48, 4, 8)
    assert all(x["holds_pattern"] for x in rep["layers"]) and not all(x["sparse_2_4"] for x in rep["layers"])


def test_check_sparsity_cli_pattern_label_and_require(tmp_path):
    f14 = _exported(tmp_path, "14.onnx", 1, 4)
    r = cli("check-sparsity", str(f14), "--pattern", "1:4", "--require", "all")
    assert r.returncode == 0, r.stderr
    assert "1:4    Conv" in r.stdout and "3 of 3 eligible layers hold 1:4" in r.stdout and "2:4" not in r.stdout
    # a 2:4 file does not hold 1:4 (the old "at least N zeros" reading said it did)
    f24 = _exported(tmp_path, "24.onnx", 2, 4)
    r = cli("check-sparsity", str(f24), "--pattern", "1:4", "--require", "all", "--format", "json")
    assert r.returncode == 3, r.stderr
    _no_traceback(r)
    rep = json.loads(r.stdout)
    assert rep["require"] == {"rule": "all", "needed": 3, "met": False} and rep["sparse_layers"] == 0
    assert "--require all: 0 of 3 eligible layers hold 1:4, needs 3" in r.stderr
    # partially sparse: only the conv holds 2:4
    part = _exported(tmp_path, "part.onnx", 2, 4, layers=("conv",))
    for require, code in (("all", 3), ("1", 0), ("2", 3), ("0.3", 0), ("0.5", 3), ("1.0", 3)):
        r = cli("check-sparsity", str(part), "--require", require)
        assert r.returncode == code, (require, r.stdout, r.stderr)
        _no_traceback(r)
        assert "1 of 3 eligible layers hold 2:4" in r.stdout


def test_check_sparsity_cli_bad_input_and_no_eligible_layer(tmp_path):
    f24 = _exported(tmp_path, "24.onnx", 2, 4)
    for bad in ("0:4", "5:4", "4:4", "2-4"):
        r = cli("check-sparsity", str(f24), "--pattern", bad)
        assert r.returncode == 2 and "--pattern" in r.stderr, (bad, r.stderr)
        _no_traceback(r)
    for bad in ("0", "-1", "1.5", "most"):
        r = cli("check-sparsity", str(f24), "--require", bad)
        assert r.returncode == 2 and "--require" in r.stderr, (bad, r.stderr)
        _no_traceback(r)
    # reduction dim 6 holds no 2:4 group; a graph without Conv/Gemm/MatMul has no layer at all
    odd = export_onnx(nn.Sequential(nn.Linear(6, 3)).eval(), (6,), tmp_path / "odd.onnx")
    none = export_onnx(nn.Sequential(nn.ReLU()).eval(), (6,), tmp_path / "none.onnx")
    for f, total in ((odd, 1), (none, 0)):
        r = cli("check-sparsity", str(f))
        assert r.returncode == 0 and "0 of 0 eligible layers hold 2:4" in r.stdout and "no eligible layer" in r.stderr
        assert f"{total} Conv/Gemm/MatMul" in r.stdout
        r = cli("check-sparsity", str(f), "--require", "1")
        assert r.returncode == 3 and "no eligible layer" in r.stderr, r.stderr
        _no_traceback(r)


# ---------------------------------------------------------------------------------------------
# 5. a prune that removes nothing fails the stage unless allow_noop


def test_prune_that_removes_nothing(write_recipe, tmp_path, one_thread):
    r = _small(gates={"max_accuracy_drop": None})
    r["stages"] = [{"kind": "train", "epochs": 1, "max_steps": 3},
                   {"kind": "prune", "ratio": 0.999999, "scope": "global"}]
    res = cli("-q", "run", str(write_recipe(r)), "--out", str(tmp_path / "a"))
    assert res.returncode == 2, res.stderr
    _no_traceback(res)
    assert "stages[1].ratio" in res.stderr and "nothing was pruned" in res.stderr and "allow_noop" in res.stderr
    # every prunable layer ignored: the ignore field is named
    r["stages"][1] = {"kind": "prune", "ratio": 0.5, "ignore": ["*"]}
    res = cli("-q", "run", str(write_recipe(r, "b.yaml")), "--out", str(tmp_path / "b"))
    assert res.returncode == 2, res.stderr
    _no_traceback(res)
    assert "stages[1].ignore" in res.stderr and "no prunable channel group" in res.stderr
    # allowed: the run completes and the stage says so
    r["stages"][1] = {"kind": "prune", "ratio": 0.999999, "allow_noop": True}
    out = tmp_path / "c"
    res = cli("-q", "run", str(write_recipe(r, "c.yaml")), "--out", str(out))
    assert res.returncode == 0, res.stderr
    s = _strict_json((out / "summary.json").read_text())
    assert "removed no channel" in s["stages"][1]["noop"]


# ---------------------------------------------------------------------------------------------
# 6. a search over its measured budget fails the run's gates


def test_search_over_budget_fails_the_gates():
    recipe = SimpleNamespace(gates=Gates(max_accuracy_drop=None))
    over = {"search": {"within_budget": False, "measured_ratio": 0.71, "budget_ratio": 0.5, "tolerance": 0.05,
                       "budget_limit_ratio": 0.525, "budget_metric": "latency", "chosen": "searched-1"}}
    res = check_gates(recipe, {"accuracy": 97.0}, {"accuracy": 96.0}, over)
    assert not res["passed"]
    msg = res["failures"][0]
    assert "searched-1" in msg and "0.710 x dense" in msg and "0.5 x dense" in msg and "0.525" in msg
    row = next(x for x in res["results"] if x["gate"] == "search_budget")
    assert row["value"] == 0.71 and row["limit"] == 0.525 and not row["passed"]
    within = {"search": {**over["search"], "within_budget": True, "measured_ratio": 0.5}}
    assert check_gates(recipe, {"accuracy": 97.0}, {"accuracy": 96.0}, within)["passed"]
    # a summary without the field (older runs, MACs-only tests) is not judged
    assert check_gates(recipe, {"accuracy": 97.0}, {"accuracy": 96.0}, {"search": {"chosen": "x"}})["passed"]
