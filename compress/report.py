"""``report.md``: a human-readable view of ``summary.json``."""
from __future__ import annotations

from pathlib import Path

from .core.model_io import atomic_write_text


def _fmt(v, nd: int = 2) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def render(summary: dict) -> str:
    d, f = summary["dense"], summary["final"]
    lines = [f"# compress report: {summary['name']}", "",
             f"Status: **{summary['status']}** (seed {summary['seed']}, device {summary['device']}, torch {summary['torch']})",
             "", "| | dense | compressed | ratio |", "|---|---|---|---|"]
    for key, label in (("accuracy", "accuracy (%)"), ("params", "params"), ("nonzero_params", "non-zero params"),
                       ("macs", "MACs / sample")):
        if key in d and key in f:
            ratio = f[key] / d[key] if d[key] else float("nan")
            lines.append(f"| {label} | {_fmt(d[key])} | {_fmt(f[key])} | {ratio:.3f} |")
    lines += ["", "## Stages", "", "| # | kind | seconds | notes |", "|---|---|---|---|"]
    for s in summary["stages"]:
        notes = []
        for k in ("skipped", "accuracy", "accuracy_after_prune", "accuracy_after_sparsify", "macs_kept",
                  "parity_max_abs_error", "sparse_layers"):
            if k in s:
                notes.append(f"{k}={_fmt(s[k], 4 if 'parity' in k else 2)}")
        lines.append(f"| {s['index']} | {s['kind']} | {s['seconds']:.1f} | {', '.join(notes)} |")
    exp = summary.get("export") or {}
    if exp:
        sp = exp.get("sparsity_2_4", {})
        lines += ["", "## Export", "",
                  f"- ONNX: `{exp.get('onnx')}` (opset {exp.get('opset')})",
                  f"- parity vs torch: max abs {exp.get('parity_max_abs_error', float('nan')):.3g}, "
                  f"mean abs {exp.get('parity_mean_abs_error', float('nan')):.3g}, "
                  f"top-1 agreement {exp.get('parity_top1_agreement', float('nan')):.2f}%",
                  f"- 2:4 along the reduction axis in the ONNX weights: {sp.get('sparse_layers', 0)} of "
                  f"{sp.get('total_layers', 0)} Conv/Gemm/MatMul layers"]
    if summary.get("benchmark"):
        lines += ["", "## Latency (median of interleaved runs, ms)", "",
                  "| backend | batch | dense p50 | compressed p50 | compressed p90 | compressed p99 | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for r in summary["benchmark"]:
            lines.append(f"| {r['backend']} | {r['batch_size']} | {_fmt(r.get('dense_ms_p50', float('nan')), 3)} | "
                         f"{_fmt(r['compressed_ms_p50'], 3)} | {_fmt(r['compressed_ms_p90'], 3)} | "
                         f"{_fmt(r['compressed_ms_p99'], 3)} | {_fmt(r.get('speedup', float('nan')), 2)}x |")
    g = summary["gates"]
    lines += ["", "## Gates", "", "passed" if g["passed"] else "FAILED: " + "; ".join(g["failures"])]
    for k, v in g.get("checked", {}).items():
        lines.append(f"- {k}: {_fmt(v, 4)}")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / "report.md", render(summary))
