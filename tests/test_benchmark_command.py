"""``compress benchmark`` on this machine's CPU with ONNX Runtime: a real run directory, one ONNX file,
a pair, a two-input (int64 token ids + float mask) model, and the input mistakes that exit 2 with one
line. Plus the pieces it shares with the benchmark stage: random inputs from the ONNX graph, the
interleaved rows, and the reading of a TensorRT engine that belongs to another GPU."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from compress.deploy import tensorrt as trb
from compress.deploy.bench import Subject, latency_table, time_backends
from compress.deploy.inputs import InputSpec, random_inputs, read_inputs, resolve_shapes
from compress.deploy.onnx_io import export_onnx
from compress.deploy.timing import BackendUnavailable
from compress.errors import InputError
from conftest import cli, tiny_recipe

HAS_TRT_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
FAST = ["--iters", "6", "--rounds", "2", "--warmup", "1"]
ROW_KEYS = {"backend", "batch_size", "threads", "compressed_ms_p50", "compressed_ms_p90", "compressed_ms_p99",
            "compressed_throughput"}
DENSE_KEYS = {"dense_ms_p50", "dense_ms_p90", "dense_ms_p99", "dense_throughput", "speedup"}


def _mlp(seed: int, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4)).eval()


class TokensAndMask(nn.Module):
    """Two inputs of two dtypes, both [batch, seq]: int64 token ids and a float mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1)
        return self.fc(h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0))


def _export_two_input(path):
    import contextlib
    import io
    import warnings

    torch.manual_seed(0)
    model = TokensAndMask().eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def _ok(res, out_dir):
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return json.loads((out_dir / "benchmark.json").read_text())


def _refused(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _check_record(rec: dict, backends: list[str], batches: list[int], dense: bool):
    assert [(r["backend"], r["batch_size"]) for r in rec["rows"]] == [(b, n) for b in backends for n in batches]
    for r in rec["rows"]:
        assert set(r) == ROW_KEYS | (DENSE_KEYS if dense else set())
        assert 0 < r["compressed_ms_p50"] <= r["compressed_ms_p90"] <= r["compressed_ms_p99"]
        if dense:
            assert r["speedup"] == pytest.approx(r["dense_ms_p50"] / r["compressed_ms_p50"])
    m, v = rec["machine"], rec["versions"]
    assert m["cores"] >= 1 and m["cpu"] and m["platform"]
    assert {"compress", "torch", "onnxruntime", "onnx"} <= set(v) and rec["device"]["cpu"]
    assert rec["command"].startswith("compress benchmark ") and rec["date"]
    assert rec["settings"]["batch_sizes"] == batches and rec["settings"]["backends"] == backends


def _md_rows(md: str) -> list[list[str]]:
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| backend")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table]


# ---------------------------------------------------------------------------------------------
# A real run directory (train -> prune -> export with int8), benchmarked on every CPU backend

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("benchrun")
    stages = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
              {"kind": "prune", "importance": "l2", "ratio": 0.5, "scope": "global"},
              {"kind": "export", "onnx": {"opset": 17, "int8": {"calibration_batches": 2}}, "parity_samples": 32}]
    recipe = d / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(name="bench", stages=stages), sort_keys=False))
    res = cli("run", str(recipe), "--out", str(d / "run"), "--quiet")
    assert res.returncode == 0, res.stderr
    return d / "run"


def test_run_directory_all_cpu_backends(run_dir, tmp_path):
    out = tmp_path / "out"
    res = cli("benchmark", str(run_dir), "--backend", "onnxruntime,onnxruntime_int8", "--backend", "torch",
              "--batch", "1,4", "--out", str(out), *FAST)
    rec = _ok(res, out)
    _check_record(rec, ["onnxruntime", "onnxruntime_int8", "torch"], [1, 4], dense=True)
    t = rec["target"]
    assert t["kind"] == "run_dir" and t["compressed"] == str(run_dir / "model.onnx")
    assert t["dense"] == str(run_dir / "stages" / "02-export" / "dense.onnx")  # from the recorded artifacts
    assert t["checkpoints"] == {"compressed": str(run_dir / "stages" / "02-export"), "dense": str(run_dir / "dense")}
    md = (out / "benchmark.md").read_text()
    rows = _md_rows(md)
    assert [(r[0], r[1]) for r in rows] == [(b, n) for b in ("onnxruntime", "onnxruntime_int8", "torch")
                                           for n in ("1", "4")]
    assert all(r[-1].endswith("x") and r[-1] != "nanx" for r in rows)  # the speedup column
    assert "![latency vs batch size](latency_vs_batch.png)" in md and rec["command"] in md
    assert (out / "latency_vs_batch.png").read_bytes()[:4] == b"\x89PNG"
    assert "onnxruntime_int8" in res.stdout and "wrote " in res.stdout  # the short text table


def test_run_directory_without_export_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    stages = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}}]
    recipe.write_text(yaml.safe_dump(tiny_recipe(name="noexport", stages=stages), sort_keys=False))
    assert cli("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet").returncode == 0
    line = _refused(cli("benchmark", str(tmp_path / "run"), "--out", str(tmp_path / "out"), *FAST),
                    "has no ONNX export", "00-train", "export stage")
    assert "TARGET" in line and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Bare ONNX files: one, a pair, two inputs of two dtypes

@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return (export_onnx(_mlp(0, hidden=8), (16,), d / "small.onnx"),
            export_onnx(_mlp(1, hidden=64), (16,), d / "dense.onnx"))


def test_single_onnx_file_json_on_stdout(onnx_files, tmp_path):
    out = tmp_path / "out"
    res = cli("benchmark", str(onnx_files[0]), "--batch", "2", "--format", "json", "--out", str(out), *FAST)
    rec = _ok(res, out)
    assert json.loads(res.stdout) == rec  # --format json prints the record it wrote
    _check_record(rec, ["onnxruntime"], [2], dense=False)
    assert rec["target"] == {"kind": "onnx", "compressed": str(onnx_files[0]), "dense": None}
    md = (out / "benchmark.md").read_text()
    assert "speedup" not in md and len(_md_rows(md)) == 1
    assert not (out / "latency_vs_batch.png").exists()  # one batch size: nothing to plot


def test_onnx_pair(onnx_files, tmp_path):
    out = tmp_path / "out"
    rec = _ok(cli("benchmark", *map(str, onnx_files), "--batch", "1", "--batch", "8", "--out", str(out), *FAST), out)
    _check_record(rec, ["onnxruntime"], [1, 8], dense=True)
    assert rec["target"]["dense"] == str(onnx_files[1])
    assert (out / "latency_vs_batch.png").is_file()


def test_two_input_int_and_float_model(tmp_path):
    path = _export_two_input(tmp_path / "tok.onnx")
    specs = read_inputs(path)
    assert [(s.name, s.dtype, s.dims) for s in specs] == [("input_ids", np.dtype(np.int64), ("batch", "seq")),
                                                          ("attention_mask", np.dtype(np.float32), ("batch", "seq"))]
    _refused(cli("benchmark", str(path), "--out", str(tmp_path / "x"), *FAST), "'input_ids'", "'seq'", "--dim seq=N")
    out = tmp_path / "out"
    rec = _ok(cli("benchmark", str(path), "--dim", "seq=12", "--batch", "1,3", "--out", str(out), *FAST), out)
    _check_record(rec, ["onnxruntime"], [1, 3], dense=False)
    assert rec["settings"]["dims"] == {"seq": 12}


# ---------------------------------------------------------------------------------------------
# Mistakes: exit 2, one line, no traceback

def test_bad_inputs_exit_2_with_one_line(onnx_files, tmp_path):
    out = str(tmp_path / "out")
    _refused(cli("benchmark", str(tmp_path / "missing.onnx"), "--out", out), "missing.onnx", "does not exist")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    _refused(cli("benchmark", str(text), "--out", out), "notes.onnx", "is not an ONNX model")
    _refused(cli("benchmark", str(onnx_files[0]), "--backend", "onnxruntime,bogus", "--out", out),
             "unknown backend 'bogus'", "onnxruntime_int8", "tensorrt")
    _refused(cli("benchmark", str(onnx_files[0]), "--backend", "torch", "--out", out), "torch", "run directory")
    assert not (tmp_path / "out").exists()


def test_target_and_option_parsing_in_process(onnx_files, tmp_path):
    """The rest of the refusals, without a subprocess each (the CLI maps every InputError to exit 2)."""
    from compress.pipeline.bench_target import parse_batches, parse_dims, resolve_target, split_list

    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(InputError, match="notes.onnx.*is not an ONNX model"):
        resolve_target([onnx_files[0], text])  # the dense file is checked too
    with pytest.raises(InputError, match="not a run directory"):
        resolve_target([tmp_path])
    with pytest.raises(InputError, match="one or two ONNX files"):
        resolve_target([onnx_files[0]] * 3)
    target = resolve_target(onnx_files)
    assert (target.compressed.onnx, target.dense.onnx, target.run_dir) == (*onnx_files, None)
    assert split_list(["onnxruntime,torch", " tensorrt "]) == ["onnxruntime", "torch", "tensorrt"]
    assert parse_batches(["1,8", "32", "8"]) == [1, 8, 32]
    for bad in (["1,x"], ["0"], [""]):
        with pytest.raises(InputError, match="--batch"):
            parse_batches(bad)
    assert parse_dims(["seq=128", "h=4,w=4"]) == {"seq": 128, "h": 4, "w": 4}
    for bad in (["seq"], ["seq=0"], ["=3"]):
        with pytest.raises(InputError, match="--dim"):
            parse_dims(bad)


@pytest.mark.skipif(HAS_TRT_GPU, reason="checks the refusal where TensorRT or a GPU is missing")
def test_tensorrt_here_names_the_extra(onnx_files, tmp_path):
    line = _refused(cli("benchmark", str(onnx_files[0]), "--backend", "onnxruntime,tensorrt",
                        "--out", str(tmp_path / "out"), *FAST), "'tensorrt'")
    if importlib.util.find_spec("tensorrt") is None:
        assert "pip install 'compress-models[tensorrt]'" in line
    else:
        assert "CUDA" in line
    assert not (tmp_path / "out").exists()  # refused before anything was timed


# ---------------------------------------------------------------------------------------------
# Shared pieces, in process

def test_random_inputs_match_the_stage_for_one_float_input(onnx_files):
    """A single float input gets exactly the array the stage always timed: standard_normal((bs, *shape))."""
    specs = read_inputs(onnx_files[0])
    assert specs == [InputSpec("input", np.dtype(np.float32), ("batch", 16))]
    x = random_inputs(specs, 5)["input"]
    np.testing.assert_array_equal(x, np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))


def test_resolve_shapes_rules():
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    ids, mask = InputSpec("ids", i64, ("b", "seq")), InputSpec("mask", f32, ("b", None, "b"))
    assert resolve_shapes([ids], 4, {"seq": 9}) == {"ids": (4, 9)}
    with pytest.raises(InputError, match="unnamed dynamic dimension at axis 1"):
        resolve_shapes([ids, mask], 2, {"seq": 3})
    # a batch name used on another axis is the batch too; a fixed first axis is not batched
    spec = InputSpec("x", f32, ("n", 3, "n"))
    assert resolve_shapes([spec, InputSpec("table", f32, (10, 4))], 2) == {"x": (2, 3, 2), "table": (10, 4)}
    # single input: the model's recorded input_shape fills symbolic dims
    assert resolve_shapes([InputSpec("img", f32, ("b", 3, "h", "w"))], 2, input_shape=(3, 32, 32)) == {"img": (2, 3, 32, 32)}
    static = [InputSpec("x", f32, (1, 16))]
    assert resolve_shapes(static, 1) == {"x": (1, 16)}
    with pytest.raises(InputError, match="fixed batch size of 1"):
        resolve_shapes(static, 8)
    arrays = random_inputs([ids, InputSpec("flag", np.dtype(bool), ("b",))], 3, {"seq": 4})
    assert arrays["ids"].dtype == np.int64 and set(np.unique(arrays["ids"])) <= {0, 1}
    assert arrays["flag"].dtype == np.bool_ and arrays["flag"].shape == (3,)


@pytest.mark.skipif(HAS_TRT_GPU, reason="checks the skip path where TensorRT or a GPU is missing")
def test_time_backends_rows_and_unavailable_once(onnx_files):
    seen = []
    rows, skipped = time_backends(Subject(onnx_files[0]), Subject(onnx_files[1]), ["tensorrt", "onnxruntime"],
                                  [1, 2], warmup=1, iters=4, rounds=2,
                                  on_unavailable=lambda b, exc: seen.append(b))
    assert seen == ["tensorrt"] and [s["backend"] for s in skipped] == ["tensorrt"]
    assert [(r["backend"], r["batch_size"]) for r in rows] == [("onnxruntime", 1), ("onnxruntime", 2)]
    assert all(set(r) == ROW_KEYS | DENSE_KEYS for r in rows)
    rows, _ = time_backends(Subject(onnx_files[0]), None, ["onnxruntime"], [3], warmup=0, iters=2, rounds=1)
    assert set(rows[0]) == ROW_KEYS and rows[0]["compressed_throughput"] > 0
    with pytest.raises(BackendUnavailable):  # without a callback the caller hears about it
        time_backends(Subject(onnx_files[0]), None, ["tensorrt"], [1], warmup=0, iters=2, rounds=1)


def test_latency_table_dense_columns_only_with_a_dense_model():
    row = {"backend": "onnxruntime", "batch_size": 1, "compressed_ms_p50": 0.5, "compressed_ms_p90": 0.6,
           "compressed_ms_p99": 0.7, "compressed_throughput": 2000.0}
    assert latency_table([row])[0] == "| backend | batch | compressed p50 | compressed p90 | compressed p99 | samples/s |"
    assert latency_table([row])[2] == "| onnxruntime | 1 | 0.500 | 0.600 | 0.700 | 2000.0 |"
    dense = {**row, "dense_ms_p50": 1.0, "speedup": 2.0}
    assert latency_table([dense])[2] == "| onnxruntime | 1 | 1.000 | 0.500 | 0.600 | 0.700 | 2.00x |"


# TensorRT's refusal of a plan from elsewhere, as its logger reports it (the messages of TensorRT 8-10
# for another compute capability, another version, another GPU model of the same capability), and
# the build record comparison made before a cached engine is reused.
FOREIGN_LOGS = [
    ["[INFO] Loaded engine size: 12 MiB",
     "[ERROR] 6: The engine plan file is generated on an incompatible device, expecting compute 8.6 got compute 8.9, "
     "please rebuild."],
    ["[ERROR] 1: [stdArchiveReader.cpp::StdArchiveReader::42] Error Code 1: Serialization (Serialization assertion "
     "stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match. Note: Current Version: 239, "
     "Serialized Engine Version: 236)"],
    ["[WARNING] Using an engine plan file across different models of devices is not recommended and is likely to "
     "affect performance or even cause errors."],
]


@pytest.mark.parametrize("lines", FOREIGN_LOGS)
def test_engine_from_another_gpu_says_rebuild(lines, tmp_path):
    err = trb.engine_load_error(tmp_path / "model.fp16.b8.engine", lines)
    msg = str(err)
    assert isinstance(err, InputError) and "\n" not in msg
    assert "model.fp16.b8.engine" in msg and "not portable" in msg and "--rebuild" in msg
    assert trb.engine_load_problem(lines) in msg  # the line TensorRT logged, without its severity tag
    assert not msg.count("[ERROR]") and not msg.count("[WARNING]")
    assert trb.engine_load_problem(["[INFO] Loaded engine size: 12 MiB"]) is None


def test_engine_build_record_mismatch(tmp_path):
    here = {"gpu": "NVIDIA L4", "compute_capability": "8.9", "tensorrt": "10.13.0"}
    engine = tmp_path / "dense.fp16.b1.engine"
    assert trb.device_file(engine).name == "dense.fp16.b1.device.json"
    assert trb.engine_device_mismatch(engine, dict(here), here) is None
    err = trb.engine_device_mismatch(engine, {**here, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
                                     here)
    assert "NVIDIA A100-SXM4-80GB (compute 8.0" in str(err) and "NVIDIA L4 (compute 8.9" in str(err)
    assert "--rebuild" in str(err)
    assert "TensorRT 10.8.0" in str(trb.engine_device_mismatch(engine, {**here, "tensorrt": "10.8.0"}, here))
