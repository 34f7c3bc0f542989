"""Benchmark backends (onnxruntime, torch, torch.compile, tensorrt), the latency plot, and the
TensorRT log / inspector parsers on captured text. TensorRT and CUDA paths are marked and skipped
where they cannot run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from compress.sparsity import masks
from compress.deploy import tensorrt as trb
from compress.deploy.backends import BACKENDS
from compress.deploy.timing import BackendUnavailable, time_interleaved
from compress.deploy.onnx_io import export_onnx, ort_session
from compress.errors import InputError
from compress.pipeline.report import plot_latency
from compress.stages import benchmark as bench_stage
from compress.stages import tensorrt as trt_stage
from compress.sparsity import n_m

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="needs TensorRT and a CUDA GPU")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Captured shape of a TensorRT 10 INFO log from an fp16 + SPARSE_WEIGHTS build (trtexec --verbose
# prints the same two lines); layer names include fusions ("A + B").
SAMPLE_LOG = """\
[11/21/2026-10:00:01] [I] [TRT] Local timing cache in use. Profiling results in this builder pass will not be stored.
[11/21/2026-10:00:03] [I] [TRT] (Sparsity) Layers eligible for sparse math: /model/stage2/conv1/Conv + /model/stage2/relu/Relu, /model/stage3/conv1/Conv, /model/fc/Gemm
[11/21/2026-10:00:09] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: /model/stage2/conv1/Conv + /model/stage2/relu/Relu
[11/21/2026-10:00:09] [I] [TRT] Engine generation completed in 8.1 seconds.
"""

# Layout of a DETAILED inspector dump (fields as TensorRT writes them for convolutions:
# "HasSparseWeights" 0/1 beside "TacticName"); the reformat layer has neither field.
SAMPLE_INSPECTOR = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to /model/stem/Conv", "LayerType": "Reformat",
         "TacticValue": "0x00000000000003e8"},
        {"Name": "/model/stem/Conv + /model/stem/Relu", "LayerType": "CaskConvolution", "HasSparseWeights": 0,
         "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize128x64x32"},
        {"Name": "/model/stage2/conv1/Conv + /model/stage2/relu/Relu", "LayerType": "CaskConvolution",
         "HasSparseWeights": 1,
         "TacticName": "sm80_xmma_fprop_sparse_conv_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize128x128x64"},
        {"Name": "/model/fc/Gemm", "LayerType": "CaskGemmConvolution", "HasSparseWeights": 0,
         "TacticName": "sm80_xmma_gemm_f16f16"},
    ],
    "Bindings": ["input", "logits"],
}


def test_parse_sparsity_log_and_report():
    log = trb.parse_sparsity_log(SAMPLE_LOG.splitlines())
    assert log["eligible"] == ["/model/stage2/conv1/Conv + /model/stage2/relu/Relu", "/model/stage3/conv1/Conv",
                               "/model/fc/Gemm"]
    assert log["picked"] == ["/model/stage2/conv1/Conv + /model/stage2/relu/Relu"]
    rep = trb.sparsity_report(SAMPLE_LOG.splitlines(), json.dumps(SAMPLE_INSPECTOR))
    assert rep["num_eligible"] == 3 and rep["num_picked_sparse"] == 1
    assert rep["eligible_not_picked"] == ["/model/stage3/conv1/Conv", "/model/fc/Gemm"]
    assert rep["inspector_sparse_tactic_layers"] == ["/model/stage2/conv1/Conv + /model/stage2/relu/Relu"]
    assert rep["inspector_sparse_weight_layers"] == ["/model/stage2/conv1/Conv + /model/stage2/relu/Relu"]
    assert rep["inspector_layers"] == 4 and rep["inspector_detailed"]
    layers = trb.parse_inspector(SAMPLE_INSPECTOR)["layers"]
    assert [la.get("sparse_weights") for la in layers] == [None, False, True, False]


def test_parse_sparsity_log_empty_lists_and_rebuilds():
    text = ("[I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_0\n"
            "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:\n"
            "[I] [TRT] (Sparsity) Layers eligible for sparse math: \n")
    log = trb.parse_sparsity_log(text.splitlines())
    assert log == {"eligible": [], "picked": []}  # the last build wins
    assert trb.parse_sparsity_log(["nothing here"]) == {"eligible": [], "picked": []}


def test_parse_inspector_without_detailed_verbosity():
    insp = trb.parse_inspector({"Layers": ["conv1", "fc"], "Bindings": []})
    assert insp["num_layers"] == 2 and insp["sparse_tactic_layers"] == [] and not insp["detailed"]


def test_strong_typing_policy():
    v = lambda s: SimpleNamespace(__version__=s)  # noqa: E731 - only the version string is read
    assert not trb.use_strong_typing(v("10.8.0.43"), "auto")
    assert trb.use_strong_typing(v("10.12.0.36"), "auto")
    assert trb.use_strong_typing(v("10.3.0"), "strong")
    assert not trb.use_strong_typing(v("10.13.0"), "weak")
    assert trb.use_strong_typing(v("11.0.0"), "weak")  # weak typing no longer exists


@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="checks the message on machines without TensorRT/CUDA")
def test_tensorrt_unavailable_says_why():
    with pytest.raises(BackendUnavailable, match="TensorRT|CUDA"):
        trb.require_tensorrt()
    with pytest.raises(BackendUnavailable):
        BACKENDS.get("tensorrt")("x.onnx", None, (3,), 1, {})


def _ctx(tmp_path, model, dense, shape):
    onnx_c = export_onnx(model, shape, tmp_path / "model.onnx")
    onnx_d = export_onnx(dense, shape, tmp_path / "dense.onnx")
    from compress.stages.artifacts import Artifacts, OnnxFiles

    return SimpleNamespace(artifacts=Artifacts(onnx=OnnxFiles(fp32="model.onnx", dense_fp32="dense.onnx")),
                           path=lambda rel: None if rel is None else tmp_path / rel, run_dir=tmp_path,
                           stage_dir=tmp_path, model=model, dense=dense, input_shape=shape,
                           device=torch.device("cpu"), index=4), onnx_c, onnx_d


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="checks the skip path on machines without TensorRT/CUDA")
def test_benchmark_stage_optional_skip_and_required_error(tmp_path):
    ctx, _, _ = _ctx(tmp_path, _mlp(0), _mlp(1), (16,))
    cfg = bench_stage.Config(backends=["tensorrt", "onnxruntime"], batch_sizes=[1, 2], iters=4, rounds=2,
                             warmup=1, optional=True)
    out = bench_stage.run(cfg, ctx)
    assert [s["backend"] for s in out.summary["benchmark_skipped"]] == ["tensorrt"]  # once, not per batch
    assert [r["backend"] for r in out.summary["benchmark"]] == ["onnxruntime", "onnxruntime"]
    assert out.skipped is None
    with pytest.raises(InputError, match="optional: true") as ei:
        bench_stage.run(bench_stage.Config(backends=["tensorrt"], optional=False), ctx)
    assert ei.value.field == "stages[4].backends"
    out = trt_stage.run(trt_stage.Config(optional=True), ctx)
    assert out.skipped and out.summary["tensorrt"]["skipped"] == out.skipped
    with pytest.raises(InputError, match="optional: true"):
        trt_stage.run(trt_stage.Config(), ctx)


def test_tensorrt_stage_config_validation():
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        trt_stage.Config(min_batch=8, opt_batch=4)
    with pytest.raises(ValueError, match="outside"):
        trt_stage.Config(batch_sizes=[128], max_batch=64)


def test_torch_backends_run_and_time(tmp_path):
    model = _mlp(0)
    eager = BACKENDS.get("torch")(None, model, (16,), 8, {"threads": 1})
    compiled = BACKENDS.get("torch_compile")(None, model, (16,), 8, {"threads": 1, "compile_backend": "eager"})
    ort_run = BACKENDS.get("onnxruntime")(export_onnx(model, (16,), tmp_path / "m.onnx"), model, (16,), 8,
                                          {"threads": 1})
    t = time_interleaved({"eager": eager, "compiled": compiled, "ort": ort_run}, warmup=2, iters=20, rounds=4)
    for name in ("eager", "compiled", "ort"):
        assert t[name]["n"] == 20 and 0 < t[name]["p50"] <= t[name]["p90"] <= t[name]["p99"]
    with pytest.raises(BackendUnavailable):
        BACKENDS.get("torch")(None, None, (16,), 1, {})


@pytest.mark.slow
def test_torch_compile_inductor():
    run = BACKENDS.get("torch_compile")(None, _mlp(0), (16,), 4, {"threads": 1})
    run()


def test_plot_latency(tmp_path):
    rows = [{"backend": "onnxruntime", "batch_size": b, "compressed_ms_p50": 0.1 * b, "compressed_ms_p90": 0.12 * b,
             "compressed_ms_p99": 0.2 * b, "dense_ms_p50": 0.2 * b, "dense_ms_p90": 0.25 * b,
             "dense_ms_p99": 0.3 * b} for b in (1, 8, 32)]
    p = plot_latency(rows, tmp_path / "plot.png")
    assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000
    assert plot_latency([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------
# GPU / TensorRT (skipped on CPU machines)

def _sparse_convnet_onnx(tmp_path) -> Path:
    """A conv net wide enough for sparse tactics (C, K >= 16), 2:4 on every conv and the classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    for mod in (model[0], model[2], model[5]):
        masks.set_mask(mod, n_m.n_m_mask(mod.weight))
    return export_onnx(model, (16, 16, 16), tmp_path / "m.onnx")


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_build_inspect_and_run_matches_onnxruntime(tmp_path):
    onnx_path = _sparse_convnet_onnx(tmp_path)
    opts = trb.BuildOptions(precision="fp32", sparse_weights=True, min_batch=1, opt_batch=4, max_batch=8,
                            timing_cache=str(tmp_path / "timing.cache"), workspace_mb=512)
    built = trb.build_engine(onnx_path, tmp_path, "sparse", opts)
    for f in (built.engine, built.inspector, built.log, opts.timing_cache):
        assert Path(f).stat().st_size > 0
    assert trb.parse_inspector(Path(built.inspector).read_text())["num_layers"] > 0
    assert "eligible_layers" in built.sparsity
    runner = trb.EngineRunner(built.engine, 4)
    runner()
    x = runner.buffers["input"].float().cpu().numpy()
    sess = ort_session(onnx_path)
    ref = sess.run(None, {"input": x})[0]
    np.testing.assert_allclose(runner.buffers["logits"].float().cpu().numpy(), ref, atol=1e-3, rtol=1e-3)
    res = trb.time_engines({"sparse": runner, "graph": trb.EngineRunner(built.engine, 4, cuda_graph=True)}, 4,
                           warmup=2, iters=20, rounds=2)
    assert res["sparse"]["gpu_ms_p50"] > 0 and res["graph"]["throughput"] > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_int8_engine_from_qdq_onnx_matches_onnxruntime_int8(tmp_path):
    """The export stage's int8 file (symmetric Q/DQ, float biases) parses and builds with
    SPARSE_WEIGHTS in either typing mode, and computes what ONNX Runtime computes from it."""
    from compress.deploy.quantize import export_int8_onnx

    onnx_path = _sparse_convnet_onnx(tmp_path)
    rng = np.random.default_rng(0)
    export_int8_onnx(onnx_path, tmp_path / "m.int8.onnx",
                     [rng.standard_normal((8, 16, 16, 16)).astype(np.float32) for _ in range(4)])
    trt = trb.require_tensorrt()
    for typing in ("strong", "weak") if trb.trt_version(trt)[0] < 11 else ("strong",):
        strong = trb.use_strong_typing(trt, typing)
        src = trb.onnx_for_precision(onnx_path, "int8", strong)
        assert src.name == "m.int8.onnx"
        opts = trb.BuildOptions(precision="int8", typing=typing, sparse_weights=True, min_batch=1, opt_batch=4,
                                max_batch=8, workspace_mb=512)
        built = trb.build_engine(src, tmp_path, f"int8_{typing}", opts)
        runner = trb.EngineRunner(built.engine, 4)
        runner()
        x = runner.buffers["input"].float().cpu().numpy()
        ref = ort_session(src).run(None, {"input": x})[0]
        got = runner.buffers["logits"].float().cpu().numpy()
        assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean() + 1e-3  # int8 kernels round differently
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


@pytest.mark.gpu
@needs_cuda
def test_semi_structured_linear_on_cuda():
    from compress.deploy.backends import semi_structured_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).cuda().half().eval()
    for mod in (model[0], model[2]):
        masks.set_mask(mod, n_m.n_m_mask(mod.weight))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    ref = model(x)
    done, skipped = semi_structured_linears(model)
    assert done == ["0", "2"], skipped
    torch.testing.assert_close(model(x), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU exit; on a GPU the script really measures")
def test_gpu_sparse_script_exits_cleanly_without_gpu(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "gpu_sparse.md"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_sparse.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_onnx_for_precision_strong_fp16_uses_fp16_export(tmp_path):
    import onnx

    path = export_onnx(_mlp(0), (16,), tmp_path / "model.onnx")
    assert trb.onnx_for_precision(path, "fp16", strong=False) == path
    assert trb.onnx_for_precision(path, "fp32", strong=True) == path
    half = trb.onnx_for_precision(path, "fp16", strong=True)
    assert half.name == "model.fp16.onnx"
    types = {t.data_type for t in onnx.load(str(half)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)  # fp32 in and out
    np.testing.assert_allclose(ort_session(half).run(None, {"input": x})[0], ort_session(path).run(None, {"input": x})[0],
                               atol=1e-2)
    assert trb.onnx_for_precision(half, "fp16", strong=True) == half


def test_report_tensorrt_section_from_build_report():
    from compress.pipeline.report import render

    sp = trb.sparsity_report(SAMPLE_LOG.splitlines(), SAMPLE_INSPECTOR)
    timings = [{"engine": e, "batch_size": 32, "gpu_ms_p50": ms, "gpu_ms_p90": ms * 1.1, "gpu_ms_p99": ms * 1.3,
                "throughput": 32000 / ms} for e, ms in (("compressed_dense_math", 2.0), ("compressed", 1.6))]
    summary = {"name": "t", "status": "passed", "seed": 0, "device": "cuda", "torch": "x",
               "dense": {"accuracy": 90.0}, "final": {"accuracy": 89.5}, "stages": [],
               "tensorrt": {"version": "10.13.0", "strongly_typed": True, "precision": "fp16", "cuda_graph": True,
                            "timings": timings, "sparsity": sp},
               "gates": {"passed": True, "failures": [], "checked": {}}}
    text = render(summary)
    assert "layers eligible for sparse math: 3; picked sparse tactics: 1" in text
    assert "eligible but dense tactic was faster: /model/stage3/conv1/Conv, /model/fc/Gemm" in text
    assert "| compressed | 32 | 1.6000 |" in text and "strongly typed, CUDA graph" in text


def test_gpu_sparse_conv_gemms_are_the_conv_and_keep_2_4():
    """What gpu_sparse.py times for convolutions is the conv: F.linear over the (r, s, c)-ordered
    im2col equals the conv, and the masked weight matrix holds 2:4 along its reduction dim."""
    from benchmarks import gpu_sparse
    from compress.sparsity.sparsegpt import conv_columns, weight_rows

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, groups=16)).eval()
    shapes = gpu_sparse.conv_gemms(model, (3, 16, 16), batch=4)
    assert sorted((s["rows"], s["reduction"], s["cols"], s["count"], s["kernel"]) for s in shapes) == [
        (4 * 8 * 8, 16, 16, 2, "1x1"), (4 * 8 * 8, 72, 16, 1, "3x3")]  # stem (C=3) and depthwise left out
    conv = model[2]
    masks.set_mask(conv, n_m.n_m_mask(conv.weight))
    x = torch.randn(4, 8, 16, 16)
    (cols,), (w2d,) = conv_columns(conv, x), weight_rows(conv)
    assert n_m.is_n_m_sparse(w2d, axis=1)
    out = torch.nn.functional.linear(cols, w2d, conv.bias).reshape(4, 8, 8, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)


def test_gpu_sparse_render_all_sections():
    """The GPU-only script's markdown renders every section (checked here so a GPU session's few
    minutes are not lost to a formatting bug); the numbers are placeholders, never written."""
    from benchmarks import gpu_sparse

    args = SimpleNamespace(dtype="fp16", resnet_batch=32)
    linear = [{"shape": "3072x768", "where": "MLP", "tokens": 512, "dense_ms": 0.1, "sparse_ms": 0.08,
               "dense_p90": 0.11, "sparse_p90": 0.09, "speedup": 1.25, "dense_tflops": 100.0, "max_abs_diff": 0.0}]
    convs = [{"shape": "100352x576 @ 576x64", "kernel": "3x3", "count": 3, "dense_ms": 0.2, "sparse_ms": 0.15,
              "speedup": 1.33},
             {"shape": "8x16 @ 16x8", "kernel": "1x1", "count": 1, "error": "shape too small"}]
    resnet = [{"model": "resnet50", "batch": 32, "precision": "int8", "dense_ms": 1.0, "sparse_ms": 0.8,
               "dense_p90": 1.1, "sparse_p90": 0.9, "speedup": 1.25, "eligible": 50, "picked_sparse": 30}]
    text = gpu_sparse.render({"device": "test"}, linear, convs, resnet, ["a note"], args)
    assert "| **all 3 layers** | | | 0.600 | 0.450 | 1.33x |" in text
    assert "not supported: shape too small" in text and "| resnet50 | 32 | int8 |" in text and "- a note" in text
