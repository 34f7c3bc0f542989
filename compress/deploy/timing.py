"""The one interleaved timer every backend and every latency number goes through.

Dense and compressed (or any set of models) are timed in one process, interleaved — each round
runs every runner for ``iters // rounds`` calls and the order flips every round (A B, B A, ...) —
so drift on a noisy machine hits all of them equally. Results are medians and tails in ms.

A runner is a zero-argument callable that runs the model once and returns when the result is
ready; its calls are timed with the host clock. A runner that times itself more exactly (a
TensorRT engine with CUDA events on its own stream) also has ``time_calls(n) -> list[ms]``, and
the timer uses that instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Runner(Protocol):
    def __call__(self) -> None: ...


@dataclass
class BackendUnavailable(Exception):
    """Raised by a backend that cannot run on this machine (no CUDA, no TensorRT)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"p50": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "n": int(a.size)}


def timed_calls(runner: Runner, n: int) -> list[float]:
    """``n`` calls of ``runner``, each timed in ms (by the runner itself where it can)."""
    own = getattr(runner, "time_calls", None)
    if own is not None:
        return list(own(n))
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def time_interleaved(runners: dict[str, Runner], warmup: int = 10, iters: int = 50, rounds: int = 5,
                     min_time_s: float = 0.0) -> dict[str, dict[str, float]]:
    """Time several runners against each other: ``warmup`` untimed calls each, then ``rounds``
    rounds (more while under ``min_time_s``), each running every runner for ``iters // rounds``
    calls, the order flipping every round. Returns per-runner percentiles in ms."""
    names = list(runners)
    for name in names:
        if warmup:
            timed_calls(runners[name], warmup)
    samples: dict[str, list[float]] = {n: [] for n in names}
    per_round = max(1, iters // rounds)
    r = 0
    start = time.perf_counter()
    while r < rounds or (time.perf_counter() - start) < min_time_s:
        for name in (names if r % 2 == 0 else list(reversed(names))):
            samples[name] += timed_calls(runners[name], per_round)
        r += 1
    return {n: percentiles(s) for n, s in samples.items()}
