"""The whole chain through the real CLI: train -> prune -> distil -> 2:4 -> distil -> ONNX -> benchmark."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import REPO, cli, tiny_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    import yaml

    recipe = d / "recipe.yaml"
    # the tiny net drops a few points (2.5 pp on one machine): a loose accuracy gate, checked
    recipe.write_text(yaml.safe_dump(tiny_recipe(gates={"max_parity_error": 1e-4, "max_accuracy_drop": 15.0}),
                                     sort_keys=False))
    out = d / "run"
    res = cli("run", str(recipe), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    return recipe, out


def test_summary_contract(tiny_run):
    _, out = tiny_run
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "passed"
    for part in ("dense", "final"):
        assert {"accuracy", "params", "macs"} <= set(s[part])
    assert s["final"]["params"] < s["dense"]["params"]
    assert s["final"]["macs"] < s["dense"]["macs"]
    assert [st["kind"] for st in s["stages"]] == ["train", "prune", "finetune", "sparsify", "finetune",
                                                  "export", "benchmark"]
    assert all(st["seconds"] >= 0 for st in s["stages"])
    assert s["export"]["onnx"] == "model.onnx"
    assert s["export"]["parity_max_abs_error"] < 1e-4
    row = s["benchmark"][0]
    assert row["backend"] == "onnxruntime" and row["batch_size"] == 1
    assert row["dense_ms_p50"] > 0 and row["compressed_ms_p50"] > 0
    assert row["speedup"] == pytest.approx(row["dense_ms_p50"] / row["compressed_ms_p50"])
    g = s["gates"]
    assert g["passed"] and g["failures"] == [] and g["warnings"] == []
    assert {r["gate"] for r in g["results"]} == {"max_accuracy_drop", "max_parity_error"}
    assert all(r["passed"] for r in g["results"])
    assert set(g["skipped"]) == {"min_accuracy", "min_speedup", "max_int8_accuracy_drop"}
    # the dense model was really trained (digits is easy: well above chance)
    assert s["dense"]["accuracy"] > 80
    # the task and the input contract are recorded (digits: pixels / 16, mean 0.5, std 0.5)
    assert s["task"] == {"name": "classification", "primary_metric": "accuracy"} and "top5" in s["final"]
    assert s["data"]["preprocess"]["mean"] == [0.5] and s["data"]["preprocess"]["pixel_scale"] == 16.0
    assert json.loads((out / "preprocess.json").read_text()) == s["data"]["preprocess"]


def test_run_directory_layout(tiny_run):
    _, out = tiny_run
    assert (out / "recipe.yaml").is_file() and (out / "report.md").is_file() and (out / "model.onnx").is_file()
    stage_dirs = sorted((out / "stages").iterdir())
    assert len(stage_dirs) == 7
    for d in stage_dirs:
        assert (d / "DONE").exists() and (d / "arch.json").is_file() and (d / "model.safetensors").is_file()
    assert "## Latency" in (out / "report.md").read_text()


def test_two_four_pattern_in_exported_onnx_initializers(tiny_run):
    """Read the ONNX file itself: every eligible Conv/Gemm weight holds 2 zeros in each group of 4
    consecutive input channels."""
    _, out = tiny_run
    m = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    checked = 0
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        name = node.input[1]
        while name not in inits and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        w = inits[name]
        if w.shape[1] % 4:
            continue  # the 1-channel stem cannot hold 2:4
        t = np.moveaxis(w, 1, -1)  # reduction dim last (Gemm weights are [out, in] with transB=1)
        groups = t.reshape(-1, 4)
        assert ((groups == 0).sum(1) >= 2).all(), node.name
        checked += 1
    assert checked >= 4


def test_onnx_runtime_agrees_with_torch(tiny_run):
    import onnxruntime as ort
    import torch

    import compress
    from compress.data import DATASETS
    from compress.data.config import DataConfig

    _, out = tiny_run
    model = compress.load(out).eval()
    test = DATASETS.get("digits")(DataConfig(), seed=0).test
    x = torch.stack([test[i][0] for i in range(64)])
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_load_in_fresh_process_without_pickle(tiny_run, tmp_path):
    """compress.load rebuilds the pruned, masked model in a new interpreter from arch.json +
    safetensors; pickle is poisoned there to prove nothing is unpickled."""
    _, out = tiny_run
    script = (
        "import pickle, sys\n"
        "def _no(*a, **k): raise RuntimeError('unpickling attempted')\n"
        "class _Poisoned(pickle.Unpickler):\n"
        "    def __init__(self, *a, **k): _no()\n"
        "pickle.load = pickle.loads = _no; pickle.Unpickler = _Poisoned\n"
        "import torch, compress\n"
        f"m = compress.load({str(out)!r})\n"
        "x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))\n"
        "print(','.join(f'{v:.6f}' for v in m(x).flatten().tolist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    import torch

    import compress

    m = compress.load(out)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expect = ",".join(f"{v:.6f}" for v in m(x).flatten().tolist())
    assert res.stdout.strip() == expect
    # masks came back as buffers, so later fine-tunes keep the 2:4 zeros
    from compress.sparsity.masks import has_masks

    assert has_masks(m)


def test_failed_gate_exits_3(write_recipe, tmp_path):
    r = tiny_recipe(gates={"min_speedup": 1000.0})
    r["stages"] = [s for s in r["stages"] if s["kind"] != "sparsify"]
    out = tmp_path / "run"
    res = cli("run", str(write_recipe(r)), "--out", str(out), "--quiet")
    assert res.returncode == 3, res.stderr
    assert "min_speedup" in res.stderr and "Traceback" not in res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "gates_failed"
    assert any("min_speedup" in f for f in s["gates"]["failures"])


def _deterministic_view(summary: dict) -> dict:
    """Everything in a summary that must not depend on timing."""
    keep = {k: summary[k] for k in ("name", "status", "dense", "final")}
    # timings, and where a killed stage continued from its step checkpoint (the crashed run only)
    varying = ("seconds", "samples_per_s", "timing_s", "resumed_at_step")
    keep["stages"] = [{k: v for k, v in st.items() if k not in varying} for st in summary["stages"]
                      if st["kind"] != "benchmark"]
    exp = dict(summary["export"])
    keep["export"] = exp
    return keep


def _short_recipe():
    r = tiny_recipe()
    r["stages"] = [
        {"kind": "train", "epochs": 12, "optimizer": {"name": "sgd", "lr": 0.1}},
        {"kind": "prune", "importance": "taylor", "ratio": 0.5, "scope": "global"},
        {"kind": "finetune", "epochs": 4, "distill": {"alpha": 0.5, "temperature": 2.0}},
        {"kind": "sparsify", "pattern": "2:4"},
        {"kind": "finetune", "epochs": 4},
        {"kind": "export"},
    ]
    return r


def test_resume_after_kill_matches_uninterrupted_run(write_recipe, tmp_path):
    recipe = write_recipe(_short_recipe())
    full = tmp_path / "full"
    res = cli("run", str(recipe), "--out", str(full), "--quiet")
    assert res.returncode == 0, res.stderr

    crashed = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--out", str(crashed), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # kill it for real once the prune stage has completed and the fine-tune is under way
    deadline = time.time() + 900  # generous: a loaded 2-core machine can be 10x slower
    marker = crashed / "stages" / "01-prune" / "DONE"
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "run ended before the prune stage completed"
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crashed / "summary.json").exists()
    assert not (crashed / "stages" / "05-export" / "DONE").exists()

    res = cli("run", str(recipe), "--out", str(crashed), "--quiet")
    assert res.returncode == 2 and "--resume" in res.stderr  # refuses to overwrite without --resume
    res = cli("run", str(recipe), "--out", str(crashed), "--resume", "--quiet")
    assert res.returncode == 0, res.stderr
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((crashed / "summary.json").read_text())
    assert _deterministic_view(a) == _deterministic_view(b)
    # and the weights are bit-identical
    from safetensors.torch import load_file

    wa = load_file(str(full / "stages" / "04-finetune" / "model.safetensors"))
    wb = load_file(str(crashed / "stages" / "04-finetune" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_resume_with_changed_recipe_is_refused(write_recipe, tmp_path):
    r = _short_recipe()
    r["stages"] = r["stages"][:1]
    r["stages"][0]["epochs"] = 1
    out = tmp_path / "run"
    assert cli("run", str(write_recipe(r)), "--out", str(out), "--quiet").returncode == 0
    r["seed"] = 1  # every stage depends on the seed: nothing can be kept (a changed stage reruns from there)
    res = cli("run", str(write_recipe(r, "changed.yaml")), "--out", str(out), "--resume", "--quiet")
    assert res.returncode == 2 and "differs" in res.stderr and "seed (0 -> 1)" in res.stderr


def test_checkpoint_skips_training(write_recipe, tmp_path):
    """With model.checkpoint the train stage is skipped and the given weights are the dense model."""
    import torch

    from compress.zoo import small_cnn

    torch.manual_seed(0)
    model = small_cnn(width=16)
    from safetensors.torch import save_file

    ckpt = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(ckpt))
    r = tiny_recipe()
    r["model"]["checkpoint"] = str(ckpt)
    r["stages"] = r["stages"][:2]
    out = tmp_path / "run"
    res = cli("run", str(write_recipe(r)), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["stages"][0]["skipped"] == "model.checkpoint given"
    assert s["dense"]["params"] == sum(p.numel() for p in model.parameters())
