"""TensorRT engines from ONNX (extra ``compress-models[tensorrt]``): build, inspect, benchmark.

Everything that touches TensorRT or CUDA imports it lazily and raises
:class:`~compress.deploy.timing.BackendUnavailable` when it is missing, so this module imports (and
its log / inspector parsers run) on any machine.

Precision and typing. TensorRT 10 builds *weakly typed* networks by default: precision is a
builder hint (``BuilderFlag.FP16`` / ``INT8``). Weak typing is deprecated from 10.12 and removed in
11, where every network is *strongly typed*: each tensor keeps the type the ONNX graph gives it,
so fp16 comes from an fp16 ONNX file (``export: {onnx: {fp16: true}}``) and int8 from the Q/DQ
nodes of the calibrated int8 file (``export: {onnx: {int8: true}}``).
``typing: auto`` picks strong typing on TensorRT >= 10.12 and weak typing before.

Sparsity. With ``BuilderFlag.SPARSE_WEIGHTS`` the builder times sparse tactics for layers whose
constant weights hold 2:4 along the reduction axis and keeps them only when faster. Its INFO log
says which layers were eligible and which picked a sparse implementation; the engine inspector
(``ProfilingVerbosity.DETAILED``) names each layer's tactic. Both are parsed into one report.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from ..errors import InputError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .files import int8_onnx_beside, onnx_sibling, precision_of
from .onnx_io import export_fp16_onnx
from .timing import BackendUnavailable, time_interleaved

ELIGIBLE_MARK = "(Sparsity) Layers eligible for sparse math:"
PICKED_MARK = "picked sparse implementation for layers:"


# ---------------------------------------------------------------------------------------------
# Parsers (pure Python: unit-tested on captured text)

def _layer_list(text: str) -> list[str]:
    """``"Conv_3 + Relu_4, MatMul_7"`` -> ``["Conv_3 + Relu_4", "MatMul_7"]`` (fused layers keep their ``+``)."""
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, list[str]]:
    """Layers the builder found eligible for sparse math and those whose chosen tactic is sparse,
    from its INFO log (``trtexec --verbose`` or a Python ILogger). The last build in the log wins."""
    eligible: list[str] = []
    picked: list[str] = []
    for line in lines:
        if ELIGIBLE_MARK in line:
            eligible = _layer_list(line.split(ELIGIBLE_MARK, 1)[1])
        elif PICKED_MARK in line:
            picked = _layer_list(line.split(PICKED_MARK, 1)[1])
    return {"eligible": eligible, "picked": picked}


def parse_inspector(info: str | dict) -> dict:
    """Engine-inspector JSON (``LayerInformationFormat.JSON``): per layer its type, tactic and
    whether it runs with sparse weights. With DETAILED profiling verbosity convolution and matmul
    layers carry ``HasSparseWeights`` (0/1), the engine's own answer; a tactic whose name says
    ``sparse`` (``sm80_xmma_fprop_sparse_conv...``) is the second, name-based signal. Without
    DETAILED verbosity the layers are bare names and neither is known."""
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    out, by_tactic, by_flag = [], [], []
    for layer in layers:
        if isinstance(layer, str):
            out.append({"name": layer})
            continue
        name = layer.get("Name", "")
        tactic = str(layer.get("TacticName") or layer.get("Tactic") or layer.get("TacticValue") or "")
        entry = {"name": name, "type": layer.get("LayerType", ""), "tactic": tactic}
        if "HasSparseWeights" in layer:
            entry["sparse_weights"] = bool(int(layer["HasSparseWeights"]))
            if entry["sparse_weights"]:
                by_flag.append(name)
        out.append(entry)
        if re.search(r"sparse", tactic, re.IGNORECASE):
            by_tactic.append(name)
    detailed = any("tactic" in e for e in out)
    return {"layers": out, "num_layers": len(out), "sparse_tactic_layers": by_tactic,
            "sparse_weight_layers": by_flag, "detailed": detailed}


def sparsity_report(log_lines: Iterable[str], inspector: str | dict | None) -> dict:
    """Eligible vs sparse-picked layers: the builder log's view, checked against the inspector."""
    log = parse_sparsity_log(log_lines)
    rep = {"eligible_layers": log["eligible"], "picked_sparse_layers": log["picked"],
           "eligible_not_picked": [n for n in log["eligible"] if n not in set(log["picked"])],
           "num_eligible": len(log["eligible"]), "num_picked_sparse": len(log["picked"])}
    if inspector is not None:
        insp = parse_inspector(inspector)
        rep["inspector_sparse_tactic_layers"] = insp["sparse_tactic_layers"]
        rep["inspector_sparse_weight_layers"] = insp["sparse_weight_layers"]
        rep["inspector_layers"] = insp["num_layers"]
        rep["inspector_detailed"] = insp["detailed"]
    return rep


# ---------------------------------------------------------------------------------------------
# TensorRT / CUDA availability

def require_tensorrt():
    """The ``tensorrt`` module, or BackendUnavailable saying what is missing (checked in this order)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed (pip install 'compress-models[tensorrt]')") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU and none is visible")
    return trt


def trt_version(trt) -> tuple[int, int]:
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return major, minor


def use_strong_typing(trt, typing: str) -> bool:
    major, minor = trt_version(trt)
    if major >= 11:
        return True  # weak typing (precision flags) is gone
    if typing == "auto":
        return (major, minor) >= (10, 12)
    return typing == "strong"


def onnx_for_precision(path: str | Path, precision: str, strong: bool) -> Path:
    """The ONNX file an engine of ``precision`` is built from. int8 and ``best`` read the int8 Q/DQ
    export beside ``path`` (explicit quantization; both typing modes). Strongly typed fp16 builds
    read ``<stem>.fp16.onnx``, written on first use; everything else reads ``path`` itself."""
    path = Path(path)
    if precision in ("int8", "best"):
        return int8_onnx_beside(path)
    if not (strong and precision == "fp16") or precision_of(path) == "fp16":
        return path
    half = onnx_sibling(path, "fp16")
    if not half.exists():
        export_fp16_onnx(path, half)
    return half


def _make_logger(trt, lines: list[str]):
    """An ILogger that keeps INFO-and-worse messages (the sparsity lines are INFO)."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.INFO):
                lines.append(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")

    return _Logger()


# ---------------------------------------------------------------------------------------------
# Portability: an engine runs only on the GPU model and TensorRT version that built it

NOT_PORTABLE = ("TensorRT engines are not portable between GPUs or TensorRT versions: rebuild it on this "
                "machine (compress benchmark --rebuild, or delete the engine)")
# What TensorRT logs when a plan cannot (or should not) run here: another compute capability,
# another TensorRT version, another GPU model of the same capability (a warning: it loads, but its
# tactics were timed on the other GPU), or bytes that are not a plan at all.
_NOT_HERE = ("incompatible device", "please rebuild", "not compatible with this version", "version tag does not match",
             "across different models of devices", "magictag", "serialization assertion")


def device_record(trt) -> dict:
    """What an engine is tied to: the GPU model, its compute capability, the TensorRT version."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def device_file(engine_path: str | Path) -> Path:
    """``<name>.device.json`` beside ``<name>.engine``: the :func:`device_record` of its build."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name.removesuffix(".engine") + ".device.json")


def engine_device_mismatch(engine_path: str | Path, built_on: dict, here: dict) -> InputError | None:
    """The error for an engine recorded as built on another GPU model / capability / TensorRT
    version than ``here``, or None when they agree."""
    keys = ("gpu", "compute_capability", "tensorrt")
    if all(built_on.get(k) == here.get(k) for k in keys):
        return None
    desc = (lambda d: f"{d.get('gpu', '?')} (compute {d.get('compute_capability', '?')}, TensorRT {d.get('tensorrt', '?')})")
    return InputError(f"TensorRT engine {Path(engine_path).name} was built on {desc(built_on)}, this machine has "
                      f"{desc(here)}; {NOT_PORTABLE}")


def engine_load_problem(log_lines: Iterable[str]) -> str | None:
    """The TensorRT log line that says a deserialised plan does not belong on this machine, or None."""
    for line in log_lines:
        if any(mark in line.lower() for mark in _NOT_HERE):
            return re.sub(r"^\[[A-Z_]+\]\s*", "", line.strip())[:240]
    return None


def engine_load_error(engine_path: str | Path, log_lines: Iterable[str]) -> InputError:
    """The one-line error for a plan TensorRT refused (or warned about) on this machine."""
    reason = engine_load_problem(log_lines) or "deserialisation failed"
    return InputError(f"TensorRT cannot use engine {Path(engine_path).name} here ({reason}); {NOT_PORTABLE}")


def check_engine_here(engine_path: str | Path, trt) -> None:
    """Before reusing a cached engine: an InputError when its build record names another GPU model
    or TensorRT version (an engine without a record is checked when it is deserialised)."""
    record = device_file(engine_path)
    if record.is_file():
        err = engine_device_mismatch(engine_path, json.loads(record.read_text()), device_record(trt))
        if err is not None:
            raise err


# ---------------------------------------------------------------------------------------------
# Build

@dataclass
class BuildOptions:
    precision: Literal["fp32", "fp16", "int8", "best"] = "fp16"
    sparse_weights: bool = True
    typing: Literal["auto", "strong", "weak"] = "auto"
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    workspace_mb: int = 4096
    optimization_level: int = 3
    timing_cache: str | None = None


@dataclass
class BuiltEngine:
    name: str
    engine: str
    inspector: str
    log: str
    onnx: str
    strongly_typed: bool
    precision: str
    sparse_weights: bool
    build_seconds: float
    tensorrt: str
    sparsity: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _configure_precision(trt, config, precision: str, strong: bool, notes: list[str]) -> None:
    """int8 is explicit (Q/DQ nodes from the export stage's calibration), never TensorRT's
    deprecated implicit calibrator: the flags only say which precisions the builder may use."""
    if strong:
        if precision in ("int8", "best"):
            notes.append("strongly typed: int8 where the ONNX graph has Q/DQ nodes (Conv/Gemm/MatMul), "
                         "the other layers in the graph's float type (fp32)")
        return
    if precision in ("fp16", "best"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision in ("int8", "best"):
        config.set_flag(trt.BuilderFlag.INT8)
        notes.append("weakly typed, explicit quantization: int8 at the Q/DQ nodes"
                     + (", fp16 allowed elsewhere" if precision == "best" else ""))


def _add_profile(trt, builder, network, config, opts: BuildOptions) -> list[dict]:
    """One optimization profile covering every dynamic input: the batch dim (0) spans
    min/opt/max; any other dynamic dim is an error (export fixes them)."""
    profile, shapes = None, []
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        if -1 not in dims:
            continue
        if any(d == -1 for d in dims[1:]):
            raise ValueError(f"input {inp.name!r} has dynamic non-batch dims {dims}; export with fixed shapes")
        profile = profile or builder.create_optimization_profile()
        mins, opt, maxs = ([b, *dims[1:]] for b in (opts.min_batch, opts.opt_batch, opts.max_batch))
        profile.set_shape(inp.name, mins, opt, maxs)
        shapes.append({"input": inp.name, "min": mins, "opt": opt, "max": maxs})
    if profile is not None:
        config.add_optimization_profile(profile)
    return shapes


def build_engine(onnx_path: str | Path, out_dir: str | Path, name: str, opts: BuildOptions) -> BuiltEngine:
    """Parse ``onnx_path``, build with ``opts`` and write ``<name>.engine``, ``<name>.layers.json``
    (engine inspector) and ``<name>.build.log`` into ``out_dir``."""
    trt = require_tensorrt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    logger = _make_logger(trt, lines)
    notes: list[str] = []
    strong = use_strong_typing(trt, opts.typing)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external data is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.builder_optimization_level = opts.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # tactic names in the inspector
    _configure_precision(trt, config, opts.precision, strong, notes)
    if opts.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profiles = _add_profile(trt, builder, network, config, opts)
    cache_path = Path(opts.timing_cache) if opts.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    atomic_write_text(out_dir / f"{name}.build.log", "\n".join(lines) + "\n")
    if serialized is None:
        raise ValueError(f"TensorRT engine build failed for {onnx_path}; see {out_dir / (name + '.build.log')}")
    blob = bytes(memoryview(serialized))
    engine_path = out_dir / f"{name}.engine"
    atomic_write_json(device_file(engine_path), device_record(trt))  # before the engine: an engine always has one
    atomic_write_bytes(engine_path, blob)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(blob)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    inspector_path = out_dir / f"{name}.layers.json"
    atomic_write_text(inspector_path, info)
    if profiles:
        notes.append(f"optimization profile: {profiles}")
    return BuiltEngine(name=name, engine=str(engine_path), inspector=str(inspector_path),
                       log=str(out_dir / f"{name}.build.log"), onnx=str(onnx_path), strongly_typed=strong,
                       precision=opts.precision, sparse_weights=opts.sparse_weights,
                       build_seconds=round(seconds, 3), tensorrt=trt.__version__,
                       sparsity=sparsity_report(lines, info), notes=notes)


# ---------------------------------------------------------------------------------------------
# Run and time

class EngineRunner:
    """One engine, one execution context, device buffers from torch (no extra CUDA bindings), a
    private stream; optionally replays a captured CUDA graph. ``__call__`` runs once and waits."""

    def __init__(self, engine_path: str | Path, batch_size: int, cuda_graph: bool = False,
                 inputs: dict | None = None):
        """``inputs``: numpy arrays by input name (random ones from the ONNX graph); inputs not
        given are filled with standard normal values, the batch (a dynamic first axis) ``batch_size``."""
        import numpy as np
        import torch

        trt = require_tensorrt()
        self._lines: list[str] = []
        self._logger = _make_logger(trt, self._lines)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None or engine_load_problem(self._lines):
            raise engine_load_error(engine_path, self._lines)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, torch.Tensor] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        gen = torch.Generator(device="cuda").manual_seed(0)
        given = inputs or {}
        for n in input_names:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
            if n in given:
                t = torch.from_numpy(np.ascontiguousarray(given[n])).to("cuda", dtype)
                shape = list(t.shape)
            else:
                shape = [batch_size if (i == 0 and d == -1) else d
                         for i, d in enumerate(self.engine.get_tensor_shape(n))]
                t = torch.randn(shape, generator=gen, device="cuda").to(dtype)
            self.context.set_input_shape(n, shape)
            self.buffers[n] = t
        for n in names:
            if n in self.buffers:
                continue
            shape = list(self.context.get_tensor_shape(n))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
            self.buffers[n] = torch.empty(shape, dtype=dtype, device="cuda")
        for n, t in self.buffers.items():
            self.context.set_tensor_address(n, t.data_ptr())
        self.graph = None
        self._enqueue()  # first call outside capture: TensorRT finishes shape-dependent setup here
        self.stream.synchronize()
        if cuda_graph:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self._enqueue()
            self.stream.synchronize()

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def launch(self) -> None:
        import torch

        if self.graph is not None:
            with torch.cuda.stream(self.stream):
                self.graph.replay()
        else:
            self._enqueue()

    def __call__(self) -> None:
        self.launch()
        self.stream.synchronize()

    def time_calls(self, iters: int) -> list[float]:
        """GPU compute time per call (CUDA events on the engine's stream), in ms."""
        import torch

        pairs = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.launch()
            end.record(self.stream)
            pairs.append((start, end))
        self.stream.synchronize()
        return [s.elapsed_time(e) for s, e in pairs]


def time_engines(runners: dict[str, EngineRunner], batch_size: int, warmup: int = 20, iters: int = 200,
                 rounds: int = 10) -> dict[str, dict]:
    """Interleaved GPU timing of several engines (the shared timer, with CUDA-event samples):
    median/p90/p99 GPU compute time and throughput at the median."""
    out = {}
    for n, p in time_interleaved(runners, warmup=warmup, iters=iters, rounds=rounds).items():
        out[n] = {"batch_size": batch_size, "gpu_ms_p50": p["p50"], "gpu_ms_p90": p["p90"],
                  "gpu_ms_p99": p["p99"], "throughput": batch_size * 1000.0 / p["p50"], "n": p["n"]}
    return out


def write_build_record(path: str | Path, engines: list[BuiltEngine]) -> None:
    atomic_write_json(path, [e.to_dict() for e in engines])
