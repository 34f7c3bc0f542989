"""int8 Q/DQ export: what TensorRT's explicit quantization needs (symmetric int8, per-channel
weights, Q/DQ around Conv/Gemm/MatMul), 2:4 surviving quantization, real ONNX Runtime sessions on
the result, and the recipe-level checks for stages that read the int8 file."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from torch import nn

from compress.sparsity import masks
from compress.deploy import tensorrt as trb
from compress.deploy.backends import BACKENDS
from compress.deploy.onnx_io import check_sparsity, export_onnx, onnx_metrics, ort_session, parity
from compress.metrics import ClassificationMeter
from compress.deploy.quantize import export_int8_onnx, quantized_nodes, unquantized_inputs
from compress.deploy.files import int8_onnx_beside
from compress.errors import InputError
from compress.recipe import validate_data
from compress.pipeline.gates import check_gates
from compress.sparsity import n_m
from conftest import cli, tiny_recipe


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    for i in (0, 3, 7):
        masks.set_mask(model[i], n_m.n_m_mask(model[i].weight))
    return model


def _calibration(n: int = 4, seed: int = 1) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.standard_normal((16, 4, 8, 8)).astype(np.float32) for _ in range(n)]


def test_int8_export_is_tensorrt_style_qdq_and_keeps_2_4(tmp_path):
    model = _net()
    fp32 = export_onnx(model, (4, 8, 8), tmp_path / "model.onnx")
    q = export_int8_onnx(fp32, tmp_path / "model.int8.onnx", _calibration(), method="minmax")
    assert q == tmp_path / "model.int8.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]  # no temp files left
    g = onnx.load(str(q)).graph
    inits = {t.name: t for t in g.initializer}
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert dqs and any(n.op_type == "QuantizeLinear" for n in g.node)
    for n in dqs:  # symmetric int8: every zero point is an int8 zero (TensorRT rejects anything else) and
        # nothing is int32: TensorRT's parser refuses an int32 DequantizeLinear, so biases stay float
        zp = numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any()
        if n.input[0] in inits:
            assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
    weight_dq = [n for n in dqs if n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    per_channel = [numpy_helper.to_array(inits[n.input[1]]).size for n in weight_dq]
    assert sorted(per_channel) == [10, 16, 32]  # one scale per output channel of each weighted layer
    assert quantized_nodes(q) == {"int8_layers": 3, "layers": 3}
    # 2:4 survives: the int8 weights have their zeros where the float weights did
    before, after = check_sparsity(fp32), check_sparsity(q)
    assert after["sparse_layers"] == before["sparse_layers"] == 3
    # and it runs on ONNX Runtime close to the float model
    x = torch.from_numpy(np.concatenate(_calibration(2, seed=7)))
    p = parity(model, q, x)
    assert p["parity_top1_agreement"] >= 90.0
    ref = model(x).detach().numpy()
    assert p["parity_mean_abs_error"] < 0.1 * np.abs(ref).mean() + 1e-3


def test_int8_calibration_methods_and_external_data(tmp_path):
    model = _net()
    fp32 = export_onnx(model, (4, 8, 8), tmp_path / "model.onnx", external_data=True)
    assert (tmp_path / "model.onnx.data").exists()
    outs = {}
    for method in ("minmax", "entropy", "percentile"):
        outs[method] = export_int8_onnx(fp32, tmp_path / f"m_{method}.onnx", _calibration(), method=method)
        assert (tmp_path / f"m_{method}.onnx.data").stat().st_size > 0  # follows the source's layout
    x = np.concatenate(_calibration(1, seed=3))
    got = {m: ort_session(p).run(None, {"input": x})[0] for m, p in outs.items()}
    assert got["minmax"].shape == (16, 10)
    # deterministic: the same batches give the same file
    again = export_int8_onnx(fp32, tmp_path / "again.onnx", _calibration(), method="minmax")
    np.testing.assert_array_equal(ort_session(again).run(None, {"input": x})[0], got["minmax"])
    with pytest.raises(ValueError, match="unknown calibration method"):
        export_int8_onnx(fp32, tmp_path / "bad.onnx", _calibration(), method="mse")
    with pytest.raises(ValueError, match="at least one batch"):
        export_int8_onnx(fp32, tmp_path / "bad.onnx", [])
    assert not (tmp_path / "bad.onnx").exists()


def test_onnx_accuracy_matches_torch_on_labels(tmp_path):
    model = _net()
    path = export_onnx(model, (4, 8, 8), tmp_path / "model.onnx")
    x = torch.from_numpy(np.concatenate(_calibration(3, seed=5)))
    y = model(x).argmax(-1)
    y[:4] = (y[:4] + 1) % 10  # four wrong labels out of 48
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, len(x), 10)]
    assert onnx_metrics(path, batches, ClassificationMeter())["accuracy"] == pytest.approx(100.0 * 44 / 48)


def test_int8_file_lookup_for_engines_and_backends(tmp_path):
    path = export_onnx(_net(), (4, 8, 8), tmp_path / "model.onnx")
    with pytest.raises(InputError, match="int8: true") as ei:
        int8_onnx_beside(path)
    assert ei.value.field == "export.onnx.int8"
    with pytest.raises(InputError):
        trb.onnx_for_precision(path, "best", strong=True)
    q = export_int8_onnx(path, tmp_path / "model.int8.onnx", _calibration(1))
    for precision in ("int8", "best"):
        for strong in (True, False):
            assert trb.onnx_for_precision(path, precision, strong) == q
    assert int8_onnx_beside(tmp_path / "model.fp16.onnx") == q and int8_onnx_beside(q) == q
    assert trb.onnx_for_precision(path, "fp32", strong=True) == path
    # the ONNX Runtime int8 backend times the int8 file beside the one it is given
    run = BACKENDS.get("onnxruntime_int8")(path, None, (4, 8, 8), 2, {"threads": 1})
    run()


def test_recipe_int8_consumers_need_an_int8_export(write_recipe):
    r = tiny_recipe()
    r["stages"].append({"kind": "tensorrt", "precision": "int8", "optional": True})
    res = cli("validate", str(write_recipe(r)))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    text = write_recipe(r).read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "precision: int8" in t)
    # an order error at validate time (exit 2), naming the field and the recipe switch that fixes it
    assert "stages[7].precision: the tensorrt stage needs the onnx.int8" in res.stderr, res.stderr
    assert "'int8: true'" in res.stderr and f"(line {line})" in res.stderr
    r["stages"][5]["onnx"]["int8"] = True
    assert validate_data(r).stages[5].onnx.int8.calibration_batches == 8
    r = tiny_recipe()
    r["stages"][6]["backends"] = ["onnxruntime", "onnxruntime_int8"]
    with pytest.raises(InputError) as ei:
        validate_data(r)
    assert ei.value.field == "stages[6].backends"
    r["stages"][5]["onnx"]["int8"] = {"calibration_batches": 2, "calibration": "entropy"}
    assert validate_data(r).stages[5].onnx.int8.calibration == "entropy"
    r["stages"][5]["onnx"]["opset"] = 12
    res = cli("validate", str(write_recipe(r)))
    assert res.returncode == 2 and "stages[5].onnx" in res.stderr and "opset >= 13" in res.stderr


def test_int8_accuracy_gate():
    r = tiny_recipe(gates={"max_int8_accuracy_drop": 1.0})
    with pytest.raises(InputError) as ei:  # the gate without an int8 export is refused at validate time
        validate_data(r)
    assert ei.value.field == "gates.max_int8_accuracy_drop" and "int8: true" in str(ei.value)
    r["stages"][5]["onnx"]["int8"] = True
    recipe = validate_data(r)
    final = {"accuracy": 97.0}
    ok = check_gates(recipe, {"accuracy": 97.5}, final, {"export": {"int8_accuracy": 96.5}})
    assert ok["passed"] and ok["checked"]["int8_accuracy_drop"] == pytest.approx(0.5)
    bad = check_gates(recipe, {"accuracy": 97.5}, final, {"export": {"int8_accuracy": 95.0}})
    assert not bad["passed"] and "int8 accuracy drop 2.00 pp" in bad["failures"][0]
    # the end-of-run fallback when the summary lacks the number (validate refuses such a recipe up front)
    missing = check_gates(recipe, {"accuracy": 97.5}, final, {"export": {}})
    assert "no export stage wrote an int8 model" in missing["failures"][0]


def test_int8_end_to_end_through_the_cli(write_recipe, tmp_path, one_thread):
    r = tiny_recipe(gates={"max_int8_accuracy_drop": 2.0, "max_accuracy_drop": None})
    r["stages"][0]["epochs"] = 2
    r["stages"][5]["onnx"]["int8"] = {"calibration_batches": 2}
    r["stages"][6]["backends"] = ["onnxruntime", "onnxruntime_int8"]
    out = tmp_path / "run"
    res = cli("--quiet", "run", str(write_recipe(r)), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    s = json.loads((out / "summary.json").read_text())
    exp = s["export"]
    assert exp["onnx_int8"] == "model.int8.onnx" and (out / exp["dense_onnx_int8"]).exists()
    assert exp["int8_quantized_layers"]["int8_layers"] == exp["int8_quantized_layers"]["layers"] > 0
    assert exp["int8_sparsity_2_4"]["sparse_layers"] == exp["sparsity_2_4"]["sparse_layers"] > 0
    assert abs(exp["int8_accuracy"] - s["final"]["accuracy"]) <= 2.0
    assert s["gates"]["checked"]["int8_accuracy_drop"] == pytest.approx(s["final"]["accuracy"] - exp["int8_accuracy"])
    assert {row["backend"] for row in s["benchmark"]} == {"onnxruntime", "onnxruntime_int8"}
    report = (out / "report.md").read_text()
    assert "int8 Q/DQ ONNX: `model.int8.onnx`" in report and "| onnxruntime_int8 | 1 |" in report
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][5]["onnx"]["int8"]["calibration_batches"] == 2


def test_deploy_guide_recipe_validates():
    """The GPU recipe in docs/deploy.md (int8 export feeding int8 engines) is a valid recipe."""
    from conftest import REPO

    text = (REPO / "docs" / "deploy.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    data["model"]["checkpoint"] = None  # the guide's weights file is the reader's own
    r = validate_data(data)
    kinds = [st.kind for st in r.stages]
    assert r.stages[kinds.index("tensorrt")].precision == "int8"
    assert r.stages[kinds.index("export")].onnx.int8.calibration == "entropy"


def test_int8_calibrates_a_bert_on_token_ids_and_attention_mask(tmp_path):
    """Several named inputs with their own dtypes: every one is fed to calibration as int64 (what
    the graph takes); int8 goes to the MatMul/Gemm layers, the integer inputs stay unquantized."""
    tf = pytest.importorskip("transformers")
    from compress.deploy.onnx_io import input_arrays

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    model = tf.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(2)

    def tokens(n):
        mask = torch.ones(n, 10, dtype=torch.long)
        mask[: n // 2, 7:] = 0  # half the rows padded
        return {"input_ids": torch.randint(0, 40, (n, 10), generator=g), "attention_mask": mask}

    fp32 = export_onnx(model, (10,), tmp_path / "bert.onnx", exporter="torchscript", example=tokens(2))
    q = export_int8_onnx(fp32, tmp_path / "bert.int8.onnx", [tokens(8) for _ in range(3)])
    graph = onnx.load(str(q)).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [
        ("input_ids", onnx.TensorProto.INT64), ("attention_mask", onnx.TensorProto.INT64)]
    assert unquantized_inputs(q) == {"input_ids": "int64", "attention_mask": "int64"}
    layers = quantized_nodes(q)
    assert layers["layers"] >= 6 and layers["int8_layers"] == layers["layers"]  # every MatMul/Gemm in int8
    x = tokens(16)
    p = parity(model, q, x)
    assert p["parity_max_abs_error"] < 0.1 * p["parity_logit_scale"]
    assert p["parity_top1_agreement"] >= 75.0
    # by name whatever the dict's order, by position for a tuple: the same feeds, the same file
    calib = [tokens(8)]
    ranges = {}
    for name, batches in (("dict", calib), ("reversed", [dict(reversed(list(b.items()))) for b in calib]),
                          ("tuple", [tuple(t for _, t in input_arrays(b)) for b in calib])):
        again = export_int8_onnx(fp32, tmp_path / f"{name}.onnx", batches)
        ranges[name] = sorted(float(numpy_helper.to_array(t)) for t in onnx.load(str(again)).graph.initializer
                              if t.name.endswith("_scale") and not t.dims)
    assert ranges["dict"] == ranges["reversed"] == ranges["tuple"] and ranges["dict"]


class _TwoFloatInputs(nn.Module):
    """An image and a side vector (both float): both get activation ranges."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.side = nn.Linear(5, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, image, side):
        return self.head(self.conv(image).mean((2, 3)) + self.side(side))


def test_int8_quantizes_every_float_input_of_a_tuple_model(tmp_path):
    model = _TwoFloatInputs().eval()
    g = torch.Generator().manual_seed(3)

    def batch(n):
        return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 5, generator=g)

    fp32 = export_onnx(model, (3, 8, 8), tmp_path / "two.onnx", exporter="torchscript", example=batch(2))
    q = export_int8_onnx(fp32, tmp_path / "two.int8.onnx", [batch(8) for _ in range(3)])
    graph = onnx.load(str(q)).graph
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert {"input_0", "input_1"} <= quantized
    assert unquantized_inputs(q) == {}
    assert quantized_nodes(q) == {"int8_layers": 3, "layers": 3}
    p = parity(model, q, batch(16))
    assert p["parity_max_abs_error"] < 0.05 * p["parity_logit_scale"] + 1e-3
    with pytest.raises(ValueError, match="1 input.*takes 2 .input_0, input_1"):
        export_int8_onnx(fp32, tmp_path / "bad.onnx", [batch(4)[0]])
    assert not (tmp_path / "bad.onnx").exists()
