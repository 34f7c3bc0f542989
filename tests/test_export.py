"""End to end on CPU: prune -> SparseGPT 2:4 -> fine-tune -> export (ONNX with external data, fp16
ONNX, .pt2) -> benchmark (onnxruntime + torch) -> tensorrt (optional, skipped here). Then the
artifacts are read back: the ONNX 2:4 check, the .pt2 program, and ``compress.load`` in a fresh
process giving the ONNX model's outputs."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from compress.deploy.onnx_io import check_sparsity, export_onnx, export_pt2, ort_session, parity
from compress.pipeline.gates import check_gates
from tests.conftest import REPO, cli, tiny_recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    r = tiny_recipe()
    stages = r["stages"]
    stages[0].update(epochs=1, max_steps=10)
    stages[2]["max_steps"] = 8  # the fine-tunes only have to run (masks through them), not converge
    stages[4]["max_steps"] = 8
    stages[3] = {"kind": "sparsify", "pattern": "2:4", "method": "sparsegpt", "calibration_batches": 2}
    stages[5] = {"kind": "export", "onnx": {"opset": 17, "fp16": True, "external_data": True}, "pt2": True,
                 "parity_samples": 128}
    stages[6] = {"kind": "benchmark", "backends": ["onnxruntime", "torch"], "batch_sizes": [1, 8],
                 "iters": 10, "rounds": 2, "warmup": 1}
    stages.append({"kind": "tensorrt", "optional": True})
    r["gates"] = {"max_parity_error": 1e-4, "max_accuracy_drop": None}  # 10 training steps: accuracy not judged
    import yaml

    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(r, sort_keys=False))
    out = tmp / "run"
    res = cli("--quiet", "run", str(recipe), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    (tmp / "log.txt").write_text(res.stdout + res.stderr)
    return out


def test_export_summary_and_artifacts(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    exp = s["export"]
    assert exp["parity_max_abs_error"] <= 1e-4 and exp["parity_top1_agreement"] == 100.0
    # the gate reads the error relative to the largest logit (equal to the absolute one for |logits| <= 1)
    assert s["gates"]["checked"]["parity_max_rel_error"] == exp["parity_max_rel_error"] <= 1e-4
    # the opset reported is the one in the file (the dynamo exporter writes >= 18 when 17 is asked)
    import onnx

    written = next(o.version for o in onnx.load(str(run_dir / "model.onnx"), load_external_data=False).opset_import
                   if o.domain in ("", "ai.onnx"))
    assert exp["opset"] == written and exp["opset_requested"] == 17
    assert exp["exporter"] in ("dynamo", "torchscript") and exp["exporter_requested"] == "auto"
    assert f"opset {written} as written" in (run_dir / "report.md").read_text()
    # external data was forced: the weights live beside the graph
    assert exp["onnx_external_data"] == "model.onnx.data" and (run_dir / "model.onnx.data").stat().st_size > 0
    assert (run_dir / "model.onnx").stat().st_size < (run_dir / "model.onnx.data").stat().st_size
    assert (run_dir / exp["onnx_fp16"]).exists() and (run_dir / exp["pt2"]).exists()
    # SparseGPT masks survived fine-tuning and export: every eligible layer is 2:4 in the ONNX file
    sp_stage = next(st for st in s["stages"] if st["kind"] == "sparsify")
    assert sp_stage["method"] == "sparsegpt" and sp_stage["layers_sparsified"]
    rep = check_sparsity(run_dir / "model.onnx")
    eligible = [layer for layer in rep["layers"] if layer["eligible"]]
    assert rep["sparse_layers"] == len(sp_stage["layers_sparsified"]) == len(eligible) == \
        exp["sparsity_2_4"]["sparse_layers"]
    # the fp16 model is close to the fp32 one (reported, not gated)
    if "fp16_parity_max_abs_error" in exp:
        assert exp["fp16_parity_top1_agreement"] > 90.0
    else:
        assert exp["fp16_parity"].startswith("not measured")


def test_tensorrt_stage_skipped_once_without_tensorrt(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    st = s["stages"][-1]
    assert st["kind"] == "tensorrt" and "TensorRT is not installed" in st["skipped"]
    assert "TensorRT is not installed" in s["tensorrt"]["skipped"]
    assert "TensorRT" in (run_dir / "report.md").read_text()


def test_benchmark_rows_plot_and_report(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    rows = s["benchmark"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {(b, n) for b in ("onnxruntime", "torch") for n in (1, 8)}
    for r in rows:
        assert 0 < r["compressed_ms_p50"] <= r["compressed_ms_p90"] <= r["compressed_ms_p99"]
        assert r["speedup"] > 0 and r["compressed_throughput"] > 0
    png = run_dir / "latency_vs_batch.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "latency_vs_batch.png" in (run_dir / "report.md").read_text()


def test_pt2_program_matches_onnx(run_dir):
    x = torch.tensor(np.random.default_rng(0).standard_normal((5, 1, 8, 8)), dtype=torch.float32)
    program = torch.export.load(str(run_dir / "model.pt2"))
    got = program.module()(x).detach().numpy()
    sess = ort_session(run_dir / "model.onnx")
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_load_in_fresh_process_matches_onnx(run_dir, tmp_path):
    x = np.random.default_rng(1).standard_normal((7, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, torch, compress\n"
        "from compress.sparsity.masks import iter_masks\n"
        "from compress.sparsity.n_m import is_n_m_sparse\n"
        f"m = compress.load({str(run_dir)!r})\n"
        "assert any(True for _ in iter_masks(m)), 'masks lost'\n"
        "for _, mod, p, _ in iter_masks(m):\n"
        "    assert is_n_m_sparse(getattr(mod, p).detach(), axis=1)\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'y.npy')!r}, m(x).numpy())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "y.npy")
    sess = ort_session(run_dir / "model.onnx")
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_export_functions_external_data_dynamic_batch_and_parity_gate(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    path = export_onnx(model, (16,), tmp_path / "m.onnx", opset=18, external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    assert not any(p.name.startswith(".onnx-") for p in tmp_path.iterdir()), "temp dir left behind"
    x = torch.randn(13, 16)  # a batch size the export never saw: dynamic batch
    par = parity(model, path, x)
    assert par["parity_max_abs_error"] < 1e-5 and par["parity_samples"] == 13
    fixed = export_onnx(model, (16,), tmp_path / "fixed.onnx", dynamic_batch=False)
    import onnx

    dims = onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    p2 = export_pt2(model, (16,), tmp_path / "m.pt2")
    torch.testing.assert_close(torch.export.load(str(p2)).module()(x), model(x))

    from types import SimpleNamespace

    from compress.recipe import Gates

    # the measured error is finite and under the gate (it can be exactly 0 on some machines)
    err = par["parity_max_abs_error"]
    assert math.isfinite(err) and 0.0 <= err < 1e-5
    g = check_gates(SimpleNamespace(gates=Gates(max_parity_error=1e-5)), {}, {}, {"export": par})
    assert g["passed"] and g["checked"]["parity_max_rel_error"] == par["parity_max_rel_error"] <= err
    # and an error over the gate fails it
    g = check_gates(SimpleNamespace(gates=Gates(max_parity_error=1e-5)), {}, {},
                    {"export": {**par, "parity_max_rel_error": 1e-3}})
    assert not g["passed"] and "max_parity_error" in g["failures"][0]
