"""A per-layer latency lookup table measured on the target backend, and the latency predictor
built on it.

Choice (documented in benchmarks/results/search.md): every Conv2d/Linear of the dense model is
measured *in isolation* as a one-node ONNX graph at a grid of (in, out) widths, on the target
backend (any factory in ``latency.BACKENDS``), at the recipe's batch size and thread count. A
candidate's latency is ``scale * sum over layers of interp(table, in, out)``, where the table
value is the layer's time minus the backend's per-call overhead (an empty graph on the same
input) and ``scale`` = measured dense end-to-end time / the sum for the dense model. Scaling
rather than adding a constant offset because what the table does not see (BatchNorm/ReLU fused
into the conv, pooling, residual additions, copies) touches the same tensors as the convs and
shrinks with them: on small_cnn a constant offset over-predicted a 75 %-pruned model by 2.5x,
the scale was within ~25 %. Bilinear interpolation between
grid points; a layer's width is read from the *pruned* model, so whatever Torch-Pruning does
(round_to, coupled groups) is what gets predicted.

The table is measured once and cached as JSON in the run directory, keyed by backend, batch
size, threads and machine (platform, CPU model, ONNX Runtime version; for ``tensorrt`` also the GPU
and the TensorRT version, the table then being built from one engine per layer signature through
the backend's own factory): a different machine or batch size gets its own entry, never stale numbers.
"""
from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..deploy.backends import BACKENDS
from ..io import atomic_write_json


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def accelerator(backend: str) -> dict:
    """The accelerator a backend's numbers depend on: for TensorRT (tables built from engines) the GPU
    and the TensorRT version; nothing for CPU backends. Empty when TensorRT or CUDA is missing (the
    measurement then says why)."""
    if backend != "tensorrt":
        return {}
    try:
        import tensorrt as trt

        if not torch.cuda.is_available():
            return {}
        return {"gpu": torch.cuda.get_device_name(0), "tensorrt": trt.__version__}
    except ImportError:
        return {}


def machine_key(backend: str, batch_size: int, threads: int, device: dict | None = None) -> dict:
    """What a measured number depends on besides the layer itself (``device``: the accelerator,
    default :func:`accelerator`)."""
    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:  # pragma: no cover
        ort_version = "none"
    return {"backend": backend, "batch_size": int(batch_size), "threads": int(threads),
            "platform": f"{platform.system()}-{platform.machine()}", "cpu": cpu_model(),
            "onnxruntime": ort_version, **(accelerator(backend) if device is None else device)}


def key_string(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Layer signatures and their one-node ONNX graphs.

def layer_signature(mod: nn.Module, in_shape: tuple[int, ...], cin: int | None = None,
                    cout: int | None = None) -> str:
    """A string naming everything the layer's latency depends on (batch and machine are the
    table's key). ``in_shape`` is one sample's input shape without the batch dimension."""
    if isinstance(mod, nn.Conv2d):
        ci = cin if cin is not None else mod.in_channels
        co = cout if cout is not None else mod.out_channels
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels
        g = ci if depthwise else mod.groups
        return (f"conv|{ci}|{co}|{mod.kernel_size[0]}x{mod.kernel_size[1]}|{mod.stride[0]}x{mod.stride[1]}|"
                f"{mod.padding[0]}x{mod.padding[1]}|{mod.dilation[0]}x{mod.dilation[1]}|{g}|"
                f"{in_shape[-2]}x{in_shape[-1]}|{int(mod.bias is not None)}")
    if isinstance(mod, nn.Linear):
        ci = cin if cin is not None else mod.in_features
        co = cout if cout is not None else mod.out_features
        tokens = int(np.prod(in_shape[:-1])) if len(in_shape) > 1 else 0
        return f"linear|{ci}|{co}|{tokens}|{int(mod.bias is not None)}"
    raise TypeError(f"no latency signature for {type(mod).__name__}")


def _onnx_for_signature(sig: str, path: Path) -> tuple[int, ...]:
    """Write a one-node ONNX graph for ``sig``; return one sample's input shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    parts = sig.split("|")
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    if parts[0] == "conv":
        ci, co = int(parts[1]), int(parts[2])
        kh, kw = (int(v) for v in parts[3].split("x"))
        sh, sw = (int(v) for v in parts[4].split("x"))
        ph, pw = (int(v) for v in parts[5].split("x"))
        dh, dw = (int(v) for v in parts[6].split("x"))
        g = int(parts[7])
        h, w = (int(v) for v in parts[8].split("x"))
        in_shape: tuple[int, ...] = (ci, h, w)
        inits.append(numpy_helper.from_array(rng.standard_normal((co, ci // g, kh, kw)).astype(np.float32), "W"))
        inputs = ["input", "W"]
        if parts[9] == "1":
            inits.append(numpy_helper.from_array(np.zeros(co, np.float32), "B"))
            inputs.append("B")
        nodes.append(helper.make_node("Conv", inputs, ["output"], kernel_shape=[kh, kw], strides=[sh, sw],
                                      pads=[ph, pw, ph, pw], dilations=[dh, dw], group=g))
    elif parts[0] == "linear":
        ci, co, tokens = int(parts[1]), int(parts[2]), int(parts[3])
        in_shape = (tokens, ci) if tokens else (ci,)
        inits.append(numpy_helper.from_array(rng.standard_normal((ci, co)).astype(np.float32), "W"))
        nodes.append(helper.make_node("MatMul", ["input", "W"], ["mm"]))
        inits.append(numpy_helper.from_array(np.zeros(co, np.float32), "B"))
        nodes.append(helper.make_node("Add", ["mm", "B"], ["output"]))
    elif parts[0] == "empty":
        in_shape = tuple(int(v) for v in parts[1].split("x"))
        nodes.append(helper.make_node("Identity", ["input"], ["output"]))
    else:
        raise ValueError(f"unknown signature {sig!r}")
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["batch", *in_shape])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(proto, str(path))
    return in_shape


def time_runner(run, target_s: float = 0.05, min_iters: int = 5, max_iters: int = 200, warmup: int = 3) -> float:
    """Median latency (ms) of ``run`` over about ``target_s`` seconds."""
    for _ in range(warmup):
        run()
    t0 = time.perf_counter()
    run()
    one = max(1e-6, time.perf_counter() - t0)
    n = int(min(max_iters, max(min_iters, target_s / one)))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(samples))


class LatencyTable:
    """Measured per-layer latencies (ms) for one (backend, batch, threads, machine) key, cached
    in ``path`` (a JSON file that may hold several keys). Thread-safe; misses are measured."""

    def __init__(self, path: str | Path, backend: str = "onnxruntime", batch_size: int = 1, threads: int = 1,
                 target_s: float = 0.05, device: dict | None = None):
        self.path = Path(path)
        self.backend = backend
        self.batch_size = batch_size
        self.threads = threads
        self.target_s = target_s
        self.key = machine_key(backend, batch_size, threads, device)
        self.key_id = key_string(self.key)
        self._lock = threading.RLock()
        self.measured = 0   # how many layers this object measured (the rest came from the cache)
        self.measure_seconds = 0.0
        self._all = json.loads(self.path.read_text()) if self.path.exists() else {}
        entry = self._all.setdefault(self.key_id, {"key": self.key, "layers": {}})
        self.layers: dict[str, float] = entry["layers"]

    def save(self) -> None:
        with self._lock:
            atomic_write_json(self.path, self._all)

    def _measure(self, sig: str) -> float:
        factory = BACKENDS.get(self.backend)
        with tempfile.TemporaryDirectory(prefix="layer-", dir=self.path.parent) as d:
            p = Path(d) / "layer.onnx"
            in_shape = _onnx_for_signature(sig, p)
            run = factory(p, None, in_shape, self.batch_size, {"threads": self.threads})
            return time_runner(run, self.target_s)

    def raw(self, sig: str) -> float:
        with self._lock:
            if sig not in self.layers:
                t0 = time.perf_counter()
                self.layers[sig] = self._measure(sig)
                self.measure_seconds += time.perf_counter() - t0
                self.measured += 1
            return self.layers[sig]

    def cost(self, sig: str, in_shape: tuple[int, ...]) -> float:
        """The layer's time minus the per-call overhead of an empty graph on the same input."""
        empty = self.raw("empty|" + "x".join(str(d) for d in in_shape))
        return max(0.0, self.raw(sig) - empty)


# ---------------------------------------------------------------------------------------------
# The predictor.

def _interp(x: float, xs: list[int], ys: list[float]) -> float:
    """Piecewise-linear in ``xs`` (sorted), linear extrapolation outside, never negative."""
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if xs[0] else 1.0)
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = int(np.searchsorted(xs, x)) - 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _grid(dense: int, fractions: Iterable[float], prunable: bool, round_to: int | None = None,
          max_points: int = 0) -> list[int]:
    """The widths measured for one layer side. With ``round_to`` and ``max_points``: every width
    ``round_to`` allows when there are at most ``max_points`` of them (the pruner can only produce
    those, so the table is exact there, cliffs included), otherwise the fractions snapped to
    multiples of ``round_to``."""
    if not prunable:
        return [dense]
    if round_to and max_points:
        allowed = list(range(round_to, dense, round_to)) + [dense]
        if len(allowed) <= max_points:
            return allowed
        return sorted({max(round_to, int(round(dense * f / round_to)) * round_to) for f in fractions} | {dense})
    return sorted({max(1, int(round(dense * f))) for f in fractions} | {dense})


class LatencyPredictor:
    """``predict(model)``: scale * sum of per-layer table lookups, for any pruned copy of ``dense``.

    ``prunable`` holds ``"name.in"`` / ``"name.out"`` for layer sides that pruning can shrink
    (the members of the dependency-graph groups); other sides get a single grid point."""

    def __init__(self, dense: nn.Module, input_shape, table: LatencyTable, prunable: set[str],
                 fractions: Iterable[float] = (0.25, 0.5, 0.75, 1.0), round_to: int | None = None,
                 max_points: int = 0):
        self.table = table
        self.fractions = tuple(fractions)
        self.in_shapes: dict[str, tuple[int, ...]] = {}
        self.layers: dict[str, dict] = {}
        hooks = []
        for name, mod in dense.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                hooks.append(mod.register_forward_hook(self._hook(name)))
        dense.eval()
        with torch.no_grad():
            dense(torch.zeros(1, *input_shape, device=next(dense.parameters()).device))
        for h in hooks:
            h.remove()
        self.modules: dict[str, nn.Module] = {}
        for name, mod in dense.named_modules():
            if name not in self.in_shapes:
                continue
            self.modules[name] = mod
            cin, cout = _io(mod)
            dw = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
            self.layers[name] = {
                "dense": (cin, cout), "depthwise": dw,
                "cin_grid": _grid(cin, self.fractions, f"{name}.in" in prunable or (dw and f"{name}.out" in prunable),
                                  round_to, max_points),
                "cout_grid": _grid(cout, self.fractions, f"{name}.out" in prunable, round_to, max_points),
            }
        self.scale = 1.0

    def _hook(self, name):
        def fn(mod, inp, out):
            self.in_shapes[name] = tuple(inp[0].shape[1:])
        return fn

    def grid_signatures(self, model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        """Every (signature, input shape) the table needs for this model's grid."""
        out = []
        mods = dict(model.named_modules())
        for name, info in self.layers.items():
            mod = mods[name]
            for ci in info["cin_grid"]:
                couts = [ci] if info["depthwise"] else info["cout_grid"]
                for co in couts:
                    shape = _with_channels(mod, self.in_shapes[name], ci)
                    out.append((layer_signature(mod, shape, ci, co), shape))
        return out

    def warm(self, model: nn.Module) -> int:
        """Measure every grid point not yet cached; return how many were measured."""
        before = self.table.measured
        for sig, shape in self.grid_signatures(model):
            self.table.cost(sig, shape)
        self.table.save()
        return self.table.measured - before

    def layer_ms(self, name: str, mod: nn.Module) -> float:
        return self.layer_ms_at(name, *_io(mod))

    def layer_ms_at(self, name: str, ci: int, co: int) -> float:
        """The table's time for layer ``name`` at ``ci`` inputs and ``co`` outputs (unscaled)."""
        info = self.layers[name]
        mod = self.modules[name]
        base = self.in_shapes[name]

        def at(c_in: int, c_out: int) -> float:
            shape = _with_channels(mod, base, c_in)
            return self.table.cost(layer_signature(mod, shape, c_in, c_out), shape)

        if info["depthwise"]:
            xs = info["cin_grid"]
            return _interp(ci, xs, [at(x, x) for x in xs])
        per_cin = [_interp(co, info["cout_grid"], [at(x, y) for y in info["cout_grid"]]) for x in info["cin_grid"]]
        return _interp(ci, info["cin_grid"], per_cin)

    def layers_ms(self, model: nn.Module) -> float:
        mods = dict(model.named_modules())
        return sum(self.layer_ms(name, mods[name]) for name in self.layers if name in mods)

    def calibrate(self, dense: nn.Module, measured_dense_ms: float) -> None:
        """Anchor the prediction to the measured dense end-to-end time."""
        self.scale = measured_dense_ms / max(1e-9, self.layers_ms(dense))

    def anchor(self, measured: dict[str, tuple[nn.Module, float]]) -> None:
        """Set the scale to the median of measured / table sum over several models timed together."""
        ratios = sorted(ms / max(1e-9, self.layers_ms(m)) for m, ms in measured.values())
        self.scale = float(np.median(ratios))

    def predict(self, model: nn.Module) -> float:
        return self.scale * self.layers_ms(model)


def _io(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Conv2d):
        return mod.in_channels, mod.out_channels
    return mod.in_features, mod.out_features


def _with_channels(mod: nn.Module, shape: tuple[int, ...], cin: int) -> tuple[int, ...]:
    if isinstance(mod, nn.Conv2d):
        return (cin, *shape[1:])
    return (*shape[:-1], cin)
