"""Latency measurement: backends behind a registry, dense and compressed timed in one process,
interleaved (A B B A ...) so drift on a noisy machine hits both equally; medians and tails."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..registry import Registry


class Runner(Protocol):
    def __call__(self) -> None: ...


@dataclass
class BackendUnavailable(Exception):
    """Raised by a backend that cannot run on this machine (no CUDA, no TensorRT)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


# A backend factory takes (onnx_path, torch_model, input_shape, batch_size, options) -> Runner.
BACKENDS: Registry[Callable[..., Runner]] = Registry("benchmark backend")


@BACKENDS.register("onnxruntime")
def onnxruntime_runner(onnx_path: str | Path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """ONNX Runtime CPU: fixed thread count, sequential execution, IOBinding (input bound once, so
    the timing is the session's compute, not host copies of a fresh numpy array)."""
    import onnxruntime as ort

    from .onnx_io import ort_session

    sess = ort_session(onnx_path, threads=options.get("threads", 1))
    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    binding = sess.io_binding()
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x))
    binding.bind_output(sess.get_outputs()[0].name, "cpu")

    def run() -> None:
        sess.run_with_iobinding(binding)

    return run


@BACKENDS.register("onnxruntime_int8")
def onnxruntime_int8_runner(onnx_path: str | Path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """ONNX Runtime CPU on the int8 Q/DQ export beside ``onnx_path`` (``export.onnx.int8``): the
    same session settings as ``onnxruntime``, so the two rows compare fp32 and int8 files."""
    from .quantize import int8_onnx_beside

    return onnxruntime_runner(int8_onnx_beside(onnx_path), model, input_shape, batch_size, options)


def _torch_device(options: dict):
    import torch

    device = torch.device(options.get("device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("CUDA requested but no GPU is visible")
    return device


def semi_structured_linears(model) -> tuple[list[str], list[dict]]:
    """On CUDA, swap every Linear weight that holds 2:4 along ``in`` for a
    ``torch.sparse.to_sparse_semi_structured`` tensor (cuSPARSELt / CUTLASS sparse kernels).
    Returns (converted layer names, skipped layers with the reason)."""
    from torch import nn
    from torch.sparse import to_sparse_semi_structured

    from .masks import is_n_m_sparse

    done, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach()
        if not is_n_m_sparse(w, axis=1):
            continue
        try:
            mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            done.append(name)
        except (RuntimeError, ValueError) as exc:  # shape / dtype / GPU constraints of the kernels
            skipped.append({"layer": name, "reason": str(exc).splitlines()[0][:160]})
    return done, skipped


def _torch_runner(model, input_shape, batch_size: int, options: dict, compiled: bool) -> Runner:
    """PyTorch eager or ``torch.compile``d. On CUDA the model runs in fp16 (the dtype the sparse
    kernels need) and, for the compressed model, 2:4 Linear weights become semi-structured."""
    import copy

    import torch

    if model is None:
        raise BackendUnavailable("the torch backend needs the model in memory")
    device = _torch_device(options)
    torch.set_num_threads(options.get("threads", 1))
    m = copy.deepcopy(model).eval().to(device)
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.float16
        m = m.to(dtype)
        if options.get("semi_structured", True) and options.get("role") == "compressed":
            semi_structured_linears(m)
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    if compiled:
        backend = options.get("compile_backend", "inductor")
        mode = options.get("compile_mode", "default") if backend == "inductor" else None
        m = torch.compile(m, backend=backend, mode=mode, dynamic=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        m(x)  # compile (and autotune) here, not inside the timed calls
    sync()

    def run() -> None:
        with torch.inference_mode():
            m(x)
        sync()

    return run


@BACKENDS.register("torch")
def torch_runner(onnx_path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """PyTorch eager on the run's device."""
    return _torch_runner(model, input_shape, batch_size, options, compiled=False)


@BACKENDS.register("torch_compile")
def torch_compile_runner(onnx_path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """``torch.compile`` (Inductor) on the run's device; compilation happens before timing."""
    return _torch_runner(model, input_shape, batch_size, options, compiled=True)


@BACKENDS.register("tensorrt")
def tensorrt_runner(onnx_path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """A TensorRT engine built from the ONNX file (SPARSE_WEIGHTS on, precision from options),
    cached beside it per batch size. Each call runs once and waits for the stream."""
    from . import tensorrt_backend as trb

    trt = trb.require_tensorrt()
    opts = trb.BuildOptions(precision=options.get("precision", "fp16"), sparse_weights=True,
                            min_batch=1, opt_batch=batch_size, max_batch=batch_size,
                            timing_cache=str(Path(onnx_path).parent / "trt.timing.cache"))
    onnx_path = trb.onnx_for_precision(onnx_path, opts.precision, trb.use_strong_typing(trt, opts.typing))
    name = f"{Path(onnx_path).stem}.{opts.precision}.b{batch_size}"
    built = trb.build_engine(onnx_path, onnx_path.parent, name, opts)
    return trb.EngineRunner(built.engine, batch_size, cuda_graph=options.get("cuda_graph", False))


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"p50": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "n": int(a.size)}


def time_interleaved(runners: dict[str, Runner], warmup: int = 10, iters: int = 50, rounds: int = 5,
                     min_time_s: float = 0.0) -> dict[str, dict[str, float]]:
    """Time several runners against each other: ``rounds`` rounds, each runs every runner for
    ``iters // rounds`` calls; the order flips every round. Returns per-runner percentiles in ms."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    per_round = max(1, iters // rounds)
    r = 0
    start = time.perf_counter()
    while r < rounds or (time.perf_counter() - start) < min_time_s:
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            fn = runners[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1000.0)
        r += 1
    return {n: percentiles(s) for n, s in samples.items()}
