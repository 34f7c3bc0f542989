"""``check_sparsity`` on hand-built ONNX graphs: the axis TensorRT reads per op, traced back through
Transpose / Cast / DequantizeLinear / Identity to the initializer; and the CLI command."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.deploy.onnx_io import check_sparsity
from tests.conftest import cli


def _two_four(shape, axis, rng, dtype=np.float32):
    """Random array holding 2:4 along ``axis`` (and, for these sizes, not along the others)."""
    w = rng.standard_normal(shape).astype(np.float32) + 3.0  # no accidental zeros
    t = np.moveaxis(w, axis, -1)
    g = t.reshape(*t.shape[:-1], t.shape[-1] // 4, 4)
    for idx in np.ndindex(*g.shape[:-1]):
        g[idx][rng.choice(4, 2, replace=False)] = 0.0
    return np.moveaxis(g.reshape(t.shape), -1, axis).astype(dtype)


def _save(tmp_path, nodes, inits, inputs, name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _by_node(rep):
    return {layer["node"]: layer for layer in rep["layers"]}


def test_gemm_matmul_axes_transpose_cast_dequantize(tmp_path):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])
    inits = {
        # Gemm transB=1: B is [N, K], reduction K = axis 1
        "w_tb": _two_four((8, 16), 1, rng),
        # Gemm transB=0 fed through Transpose of a [N, K] initializer: B = W^T is [K, N], axis 0
        "w_tr": _two_four((8, 16), 1, rng),
        # Gemm transB=1 with 2:4 along the wrong axis (N)
        "w_wrong": _two_four((8, 16), 0, rng),
        # MatMul B [K, N] 2:4 along K (axis 0): right; along N: wrong
        "w_mm_ok": _two_four((16, 8), 0, rng),
        "w_mm_bad": _two_four((16, 8), 1, rng),
        # fp16 initializer through Cast
        "w_half": _two_four((16, 8), 0, rng).astype(np.float16),
        # int8 weights with zero point 0 through DequantizeLinear (per-tensor scale)
        "w_q": _two_four((16, 8), 0, rng).round().clip(-127, 127).astype(np.int8),
        "q_scale": np.array(0.02, np.float32), "q_zp": np.array(0, np.int8),
        # int8 with per-channel zero point 5: zeros are where q == 5
        "w_qz": np.where(_two_four((16, 8), 0, rng) == 0, 5, 9).astype(np.int8),
        "qz_scale": np.full(8, 0.1, np.float32), "qz_zp": np.full(8, 5, np.int8),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w_tb"], ["y1"], name="gemm_transB", transB=1),
        helper.make_node("Transpose", ["w_tr"], ["w_tr_t"], perm=[1, 0]),
        helper.make_node("Identity", ["w_tr_t"], ["w_tr_id"]),
        helper.make_node("Gemm", ["x", "w_tr_id"], ["y2"], name="gemm_transposed"),
        helper.make_node("Gemm", ["x", "w_wrong"], ["y3"], name="gemm_wrong_axis", transB=1),
        helper.make_node("MatMul", ["x", "w_mm_ok"], ["y4"], name="matmul_ok"),
        helper.make_node("MatMul", ["x", "w_mm_bad"], ["y5"], name="matmul_wrong_axis"),
        helper.make_node("Cast", ["w_half"], ["w_half_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w_half_f"], ["y6"], name="matmul_cast"),
        helper.make_node("DequantizeLinear", ["w_q", "q_scale", "q_zp"], ["w_dq"]),
        helper.make_node("MatMul", ["x", "w_dq"], ["y7"], name="matmul_int8"),
        helper.make_node("DequantizeLinear", ["w_qz", "qz_scale", "qz_zp"], ["w_dqz"], axis=1),
        helper.make_node("MatMul", ["x", "w_dqz"], ["y8"], name="matmul_int8_zero_point"),
        helper.make_node("Sum", ["y1", "y2", "y3", "y4", "y5", "y6", "y7", "y8"], ["y"]),
    ]
    rep = check_sparsity(_save(tmp_path, nodes, inits, [x]))
    by = _by_node(rep)
    expect = {"gemm_transB": (1, True), "gemm_transposed": (0, True), "gemm_wrong_axis": (1, False),
              "matmul_ok": (0, True), "matmul_wrong_axis": (0, False), "matmul_cast": (0, True),
              "matmul_int8": (0, True), "matmul_int8_zero_point": (0, True)}
    for node, (axis, ok) in expect.items():
        assert by[node]["axis"] == axis, node
        assert by[node]["sparse_2_4"] is ok, node
    assert by["gemm_transposed"]["shape"] == [16, 8]  # as the Gemm sees it, after the Transpose
    assert rep["sparse_layers"] == 6 and rep["total_layers"] == 8
    assert by["matmul_wrong_axis"]["fraction_groups_ok"] < 1.0


def test_conv_axis1_grouped_depthwise_and_ineligible(tmp_path):
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 6, 6])
    inits = {
        "w_ok": _two_four((12, 8, 3, 3), 1, rng),
        "w_bad": _two_four((12, 8, 3, 3), 0, rng),
        "w_grp": _two_four((8, 4, 1, 1), 1, rng),     # groups=2: 4 input channels per group
        "w_dw": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "w_stem": rng.standard_normal((8, 6, 1, 1)).astype(np.float32),
    }
    x6 = helper.make_tensor_value_info("x6", TensorProto.FLOAT, [None, 6, 6, 6])
    nodes = [
        helper.make_node("Conv", ["x", "w_ok"], ["a"], name="conv_ok", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w_bad"], ["b"], name="conv_wrong_axis", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w_grp"], ["c"], name="conv_grouped", group=2),
        helper.make_node("Conv", ["x", "w_dw"], ["d"], name="conv_dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x6", "w_stem"], ["e"], name="conv_c6"),
        helper.make_node("Concat", ["a", "b", "c", "d", "e"], ["y"], axis=1),
    ]
    rep = check_sparsity(_save(tmp_path, nodes, inits, [x, x6]))
    by = _by_node(rep)
    assert by["conv_ok"]["sparse_2_4"] and by["conv_ok"]["axis"] == 1
    assert not by["conv_wrong_axis"]["sparse_2_4"] and by["conv_wrong_axis"]["eligible"]
    assert by["conv_grouped"]["sparse_2_4"]
    assert by["conv_dw"]["reason"] == "depthwise" and not by["conv_dw"]["eligible"]
    assert not by["conv_c6"]["eligible"] and "6 % 4" in by["conv_c6"]["reason"]
    assert rep["sparse_layers"] == 2


def test_check_sparsity_cli(tmp_path):
    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm_sparse"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm_dense")]
    path = _save(tmp_path, nodes, {"w1": _two_four((16, 16), 0, rng),
                                   "w2": rng.standard_normal((16, 4)).astype(np.float32)}, [x])
    r = cli("check-sparsity", str(path))
    assert r.returncode == 0, r.stderr
    assert "2:4    MatMul mm_sparse" in r.stdout and "no     MatMul mm_dense" in r.stdout
    assert "1 of 2 eligible layers hold 2:4" in r.stdout
    r = cli("check-sparsity", str(path), "--format", "json")
    rep = json.loads(r.stdout)
    assert [layer["sparse_2_4"] for layer in rep["layers"]] == [True, False]
    assert [layer["holds_pattern"] for layer in rep["layers"]] == [True, False]
    bad = tmp_path / "not.onnx"
    bad.write_text("hello")
    r = cli("check-sparsity", str(bad))
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr
