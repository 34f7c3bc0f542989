"""Dense vs compressed latency on each backend and batch size: the one implementation behind the
``benchmark`` stage and the ``compress benchmark`` command.

:func:`time_backends` builds a runner per model (compressed, and dense when there is one) for each
backend and batch size, times them against each other with
:func:`~compress.deploy.timing.time_interleaved` (order flipping every round) and returns one row
per backend and batch size: ``backend, batch_size, threads, compressed_ms_p50/p90/p99,
compressed_throughput`` and, with a dense model, the same ``dense_*`` keys and ``speedup`` (dense
p50 / compressed p50). A backend that cannot run on this machine goes to the caller's
``on_unavailable`` once (not once per batch size); if that returns, the backend is skipped.

The rest is what the command writes: the machine record (:func:`environment`), ``benchmark.md``
(:func:`render`, the same latency table as the run report: :func:`latency_table`) and the
latency-vs-batch plot (:func:`plot_latency`, the run report's too).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..version import __version__ as COMPRESS_VERSION
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .backends import BACKENDS
from .timing import BackendUnavailable, time_interleaved

BENCHMARK_JSON = "benchmark.json"
BENCHMARK_MD = "benchmark.md"
LATENCY_PLOT = "latency_vs_batch.png"


@dataclass
class Subject:
    """One model to time: its ONNX file (the ONNX and TensorRT backends) and, for the torch
    backends, the model in memory with its per-sample input shape."""

    onnx: Path | None
    model: Any = None
    input_shape: Sequence[int] | None = None


def latency_row(backend: str, batch_size: int, threads: int, timings: dict[str, dict[str, float]]) -> dict:
    """A published row from :func:`~compress.deploy.timing.time_interleaved`'s percentiles."""
    c = timings["compressed"]
    row = {"backend": backend, "batch_size": batch_size, "threads": threads,
           "compressed_ms_p50": c["p50"], "compressed_ms_p90": c["p90"], "compressed_ms_p99": c["p99"],
           "compressed_throughput": batch_size * 1000.0 / c["p50"]}
    if "dense" in timings:
        d = timings["dense"]
        row.update({"dense_ms_p50": d["p50"], "dense_ms_p90": d["p90"], "dense_ms_p99": d["p99"],
                    "dense_throughput": batch_size * 1000.0 / d["p50"], "speedup": d["p50"] / c["p50"]})
    return row


def time_backends(compressed: Subject, dense: Subject | None, backends: Sequence[str], batch_sizes: Sequence[int],
                  *, threads: int = 1, warmup: int = 10, iters: int = 100, rounds: int = 10,
                  options: dict | None = None,
                  on_unavailable: Callable[[str, BackendUnavailable], None] | None = None,
                  ) -> tuple[list[dict], list[dict]]:
    """Time ``compressed`` (and ``dense``) on every backend x batch size, interleaved. Returns
    ``(rows, skipped)``; ``skipped`` lists ``{"backend", "reason"}`` for backends that could not
    run here and that ``on_unavailable`` let pass (without a callback they raise). ``options`` go
    to every backend factory (``device``, ``precision``, ``cuda_graph``, ``dims``, ...), plus
    ``threads`` and the ``role`` of the model. torch's thread count is restored afterwards."""
    rows: list[dict] = []
    skipped: list[dict] = []
    subjects = {"compressed": compressed, **({"dense": dense} if dense is not None else {})}
    threads_before = torch.get_num_threads()
    try:
        for backend in backends:
            factory = BACKENDS.get(backend)
            for bs in batch_sizes:
                opts = {**(options or {}), "threads": threads}
                try:
                    runners = {role: factory(s.onnx, s.model, s.input_shape, bs, {**opts, "role": role})
                               for role, s in subjects.items()}
                except BackendUnavailable as exc:
                    if on_unavailable is None:
                        raise
                    on_unavailable(backend, exc)
                    skipped.append({"backend": backend, "reason": str(exc)})
                    break  # said once per backend, not once per batch size
                t = time_interleaved(runners, warmup=warmup, iters=iters, rounds=rounds)
                rows.append(latency_row(backend, bs, threads, t))
    finally:
        torch.set_num_threads(threads_before)
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# What the command records and writes

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """compress (this checkout), Python and the libraries a timing depends on; TensorRT only where
    installed (its version from the package metadata, without importing it)."""
    out = {"compress": COMPRESS_VERSION, "python": platform.python_version(), "torch": torch.__version__}
    for dist, key in (("onnxruntime", "onnxruntime"), ("onnxruntime-gpu", "onnxruntime"), ("onnx", "onnx"),
                      ("numpy", "numpy"), ("tensorrt", "tensorrt")):
        v = _version(dist)
        if v is not None and key not in out:
            out[key] = v
    return out


def environment() -> dict:
    """Machine and device: where the numbers were measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    machine = {"hostname": platform.node(), "platform": platform.platform(), "cpu": _cpu_name(),
               "cores": os.cpu_count(), "cores_usable": usable}
    device: dict[str, Any] = {"cpu": machine["cpu"]}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device.update({"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
                       "cuda": torch.version.cuda})
    return {"machine": machine, "device": device, "versions": versions()}


def record(rows: list[dict], target: dict, settings: dict, argv: Sequence[str] | None = None) -> dict:
    """``benchmark.json``: rows plus everything needed to read them later."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return {"target": target, "settings": settings, "rows": rows, **environment(),
            "command": shlex.join(["compress", *argv]),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _fmt(v: float, nd: int) -> str:
    return f"{v:.{nd}f}"


def latency_table(rows: list[dict]) -> list[str]:
    """Markdown table of latency rows (the run report's and ``benchmark.md``'s): dense columns and
    the speedup only when some row has a dense model."""
    if not any("dense_ms_p50" in r for r in rows):
        lines = ["| backend | batch | compressed p50 | compressed p90 | compressed p99 | samples/s |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['backend']} | {r['batch_size']} | {_fmt(r['compressed_ms_p50'], 3)} | "
                         f"{_fmt(r['compressed_ms_p90'], 3)} | {_fmt(r['compressed_ms_p99'], 3)} | "
                         f"{_fmt(r['compressed_throughput'], 1)} |")
        return lines
    lines = ["| backend | batch | dense p50 | compressed p50 | compressed p90 | compressed p99 | speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['batch_size']} | {_fmt(r.get('dense_ms_p50', float('nan')), 3)} | "
                     f"{_fmt(r['compressed_ms_p50'], 3)} | {_fmt(r['compressed_ms_p90'], 3)} | "
                     f"{_fmt(r['compressed_ms_p99'], 3)} | {_fmt(r.get('speedup', float('nan')), 2)}x |")
    return lines


def render(rec: dict, plot: str | None = None) -> str:
    """``benchmark.md`` for a :func:`record`."""
    t, s, m, d, v = rec["target"], rec["settings"], rec["machine"], rec["device"], rec["versions"]
    where = f"{d['gpu']} (compute {d['compute_capability']}, CUDA {d['cuda']}); " if "gpu" in d else ""
    lines = ["# compress benchmark", "",
             f"- compressed: `{t['compressed']}`" + (f"; dense: `{t['dense']}`" if t.get("dense") else ""),
             f"- machine: {m['hostname']}, {m['platform']}; {where}CPU {m['cpu']}, {m['cores_usable']} of "
             f"{m['cores']} cores usable",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- settings: {s['threads']} thread(s), {s['warmup']} warm-up calls, {s['iters']} timed calls per model "
             f"in {s['rounds']} interleaved rounds" + (f", TensorRT precision {s['precision']}"
                                                        if "tensorrt" in s["backends"] else ""),
             f"- command: `{rec['command']}`", f"- date: {rec['date']}",
             "", "## Latency (median of interleaved runs, ms)", "", *latency_table(rec["rows"])]
    if plot:
        lines += ["", f"![latency vs batch size]({plot})"]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | Path, rec: dict) -> list[Path]:
    """``benchmark.json``, ``benchmark.md`` and, with more than one batch size, the plot (atomically)."""
    out_dir = Path(out_dir)
    written = []
    plot = None
    if len({r["batch_size"] for r in rec["rows"]}) > 1:
        plot = plot_latency(rec["rows"], out_dir / LATENCY_PLOT)
    atomic_write_json(out_dir / BENCHMARK_JSON, rec)
    atomic_write_text(out_dir / BENCHMARK_MD, render(rec, plot.name if plot else None))
    written += [out_dir / BENCHMARK_JSON, out_dir / BENCHMARK_MD] + ([plot] if plot else [])
    return written


def plot_latency(rows: list[dict], path: str | Path) -> Path | None:
    """Latency (median, p90 as error bar) vs batch size per backend, dense and compressed, as a PNG
    written atomically. None when there is nothing to plot."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in rows if "compressed_ms_p50" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for backend in sorted({r["backend"] for r in rows}):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in rs]
        for role, style in (("dense", "--o"), ("compressed", "-s")):
            if all(f"{role}_ms_p50" in r for r in rs):
                p50 = [r[f"{role}_ms_p50"] for r in rs]
                up = [r[f"{role}_ms_p90"] - r[f"{role}_ms_p50"] for r in rs]
                ax.errorbar(bs, p50, yerr=[[0] * len(up), up], fmt=style, capsize=3, label=f"{backend} {role}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per call, ms (median; bar to p90)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
