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
