"""``report.md``: a human-readable view of ``summary.json``."""
from __future__ import annotations

from pathlib import Path

from ..deploy.bench import LATENCY_PLOT as PLOT_NAME
from ..deploy.bench import latency_table, plot_latency
from ..io import as_number, atomic_write_text


def _fmt(v, nd: int = 2) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _num(v, spec: str) -> str:
    """A number that may be missing or a non-finite value read back from JSON (``"NaN"``)."""
    v = as_number(v)
    return format(v, spec) if isinstance(v, (int, float)) else ("n/a" if v is None else str(v))


def render(summary: dict) -> str:
    d, f = summary["dense"], summary["final"]
    lines = [f"# compress report: {summary['name']}", "",
             f"Status: **{summary['status']}** (seed {summary['seed']}, device {summary['device']}, torch {summary['torch']})",
             "", "| | dense | compressed | ratio |", "|---|---|---|---|"]
    for key, label in (("accuracy", "accuracy (%)"), ("top5", "top-5 accuracy (%)"), ("miou", "mean IoU (%)"),
                       ("pixel_accuracy", "pixel accuracy (%)"), ("metric", "metric"), ("params", "params"), ("nonzero_params", "non-zero params"),
                       ("macs", "MACs / sample")):
        if key in d and key in f:
            ratio = f[key] / d[key] if d[key] else float("nan")
            lines.append(f"| {label} | {_fmt(d[key])} | {_fmt(f[key])} | {ratio:.3f} |")
    lines += ["", "## Stages", "", "| # | kind | seconds | notes |", "|---|---|---|---|"]
    for s in summary["stages"]:
        notes = []
        for k in ("skipped", "accuracy", "accuracy_after_prune", "accuracy_after_sparsify", "miou",
                  "miou_after_prune", "miou_after_sparsify", "metric", "macs_kept",
                  "parity_max_abs_error", "sparse_layers"):
            if k in s:
                notes.append(f"{k}={_fmt(s[k], 4 if 'parity' in k else 2)}")
        lines.append(f"| {s['index']} | {s['kind']} | {s['seconds']:.1f} | {', '.join(notes)} |")
    lines += _data_section(summary.get("data") or {}, summary.get("task") or {})
    exp = summary.get("export") or {}
    if exp:
        sp = exp.get("sparsity_2_4", {})
        lines += ["", "## Export", "",
                  f"- ONNX: `{exp.get('onnx')}` (opset {exp.get('opset')} as written, "
                  f"{exp.get('exporter', 'torchscript')} exporter)"
                  + (f"; fallback: {exp['export_fallback']}" if exp.get("export_fallback") else ""),
                  f"- parity vs torch: max abs {_num(exp.get('parity_max_abs_error'), '.3g')}"
                  + (f" (relative to the largest logit {_num(exp.get('parity_logit_scale'), '.3g')}: "
                     f"{_num(exp.get('parity_max_rel_error'), '.3g')})" if "parity_max_rel_error" in exp else "")
                  + ", "
                  f"mean abs {_num(exp.get('parity_mean_abs_error'), '.3g')}, "
                  f"top-1 agreement {_num(exp.get('parity_top1_agreement'), '.2f')}%",
                  f"- 2:4 along the reduction axis in the ONNX weights: {sp.get('sparse_layers', 0)} of "
                  f"{sp.get('total_layers', 0)} Conv/Gemm/MatMul layers"]
        for key, label in (("onnx_fp16", "fp16 ONNX"), ("pt2", "torch.export program")):
            if key in exp:
                lines.append(f"- {label}: `{exp[key]}`")
        if "onnx_int8" in exp:
            q, sp8 = exp.get("int8_quantized_layers", {}), exp.get("int8_sparsity_2_4", {})
            score = next(((k[5:], exp[k]) for k in ("int8_accuracy", "int8_miou", "int8_metric") if k in exp),
                         ("accuracy", None))
            lines.append(f"- int8 Q/DQ ONNX: `{exp['onnx_int8']}`: {score[0]} {_fmt(score[1])} "
                         f"(ONNX Runtime, test split), top-1 agreement with torch fp32 "
                         f"{_fmt(exp.get('int8_parity_top1_agreement'))}%, {q.get('int8_layers', 0)} of "
                         f"{q.get('layers', 0)} Conv/Gemm/MatMul in int8, 2:4 kept in {sp8.get('sparse_layers', 0)}")
            kept = exp.get("int8_unquantized_inputs") or {}
            if kept:
                lines.append("  (integer inputs left unquantized: "
                             + ", ".join(f"`{k}` {v}" for k, v in kept.items()) + ")")
    if summary.get("benchmark"):
        lines += ["", "## Latency (median of interleaved runs, ms)", "", *latency_table(summary["benchmark"])]
    if summary.get("benchmark"):
        lines += ["", f"![latency vs batch size]({PLOT_NAME})"]
    lines += _tensorrt_section(summary.get("tensorrt") or {})
    lines += _gates_section(summary["gates"])
    return "\n".join(lines) + "\n"


def _data_section(data: dict, task: dict) -> list[str]:
    """The task, the splits, the input contract (preprocessing) and skipped files."""
    if not data:
        return []
    lines = ["", "## Data and task", "",
             f"- task: {task.get('name', 'classification')} (primary metric: {task.get('primary_metric', 'accuracy')})",
             f"- dataset {data.get('dataset')}: {data.get('train_samples')} train / {data.get('test_samples')} test "
             f"samples" + (f", {data['num_classes']} classes" if data.get("num_classes") else "")]
    pre = data.get("preprocess")
    if pre:
        lines += [f"- input contract ({pre.get('source')}; also in model.onnx metadata `compress.preprocess`): "
                  f"resize {pre.get('resize')}, crop {pre.get('crop')}, pixel scale {pre.get('pixel_scale')}, "
                  f"mean {pre.get('mean')}, std {pre.get('std')}, {pre.get('interpolation')}"]
    else:
        lines.append("- input contract: defined by the dataset callable (compress applied no preprocessing)")
    if data.get("augment_backend"):
        lines.append(f"- training augmentation: {data['augment_backend']}")
    if "skipped_files" in data:
        lines.append(f"- unreadable files skipped (data.on_bad_file: skip): {data['skipped_files']}"
                     + (f", e.g. {', '.join(data['skipped_examples'][:3])}" if data.get("skipped_examples") else ""))
    return lines


def _gates_section(g: dict) -> list[str]:
    """Which gates were checked (value, rule, limit), which were skipped and why, and warnings."""
    lines = ["", "## Gates", "", "passed" if g["passed"] else "FAILED: " + "; ".join(g["failures"])]
    if g.get("warnings"):
        lines += [""] + [f"> warning: {w}" for w in g["warnings"]]
    if "results" in g:
        if g["results"]:
            lines += ["", "| gate | value | rule | limit | |", "|---|---|---|---|---|"]
            for r in g["results"]:
                value = r["value"]
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                note = f" ({r['note']})".replace("|", "\\|") if r.get("note") else ""  # a table cell
                lines.append(f"| {r['gate']}{note} | {shown} | {r['rule']} | {r['limit']} | "
                             f"{'ok' if r['passed'] else '**failed**'} |")
    else:  # a summary written before gates listed their results
        for k, v in g.get("checked", {}).items():
            lines.append(f"- {k}: {_fmt(v, 4)}")
    if g.get("skipped"):
        lines += ["", "Not checked:", ""] + [f"- {k}: {why}" for k, why in g["skipped"].items()]
    return lines


def _tensorrt_section(trt: dict) -> list[str]:
    if not trt:
        return []
    if "skipped" in trt:
        return ["", "## TensorRT", "", f"skipped: {trt['skipped']}"]
    sp = trt.get("sparsity", {})
    lines = ["", "## TensorRT", "",
             f"TensorRT {trt.get('version')}, {trt.get('precision')}, "
             f"{'strongly' if trt.get('strongly_typed') else 'weakly'} typed"
             f"{', CUDA graph' if trt.get('cuda_graph') else ''}", "",
             f"- layers eligible for sparse math: {sp.get('num_eligible', 0)}; picked sparse tactics: "
             f"{sp.get('num_picked_sparse', 0)}"]
    if sp.get("eligible_not_picked"):
        lines.append(f"- eligible but dense tactic was faster: {', '.join(sp['eligible_not_picked'])}")
    if "inspector_sparse_weight_layers" in sp:
        lines.append(f"- engine inspector: {len(sp['inspector_sparse_weight_layers'])} layers run with sparse "
                     f"weights (HasSparseWeights), {len(sp.get('inspector_sparse_tactic_layers', []))} "
                     "with a sparse tactic name")
    for engine in trt.get("engines", []):
        for note in engine.get("notes", []):
            if not note.startswith("optimization profile"):
                lines.append(f"- {engine.get('name')}: {note}")
    lines += ["", "| engine | batch | GPU ms p50 | p90 | p99 | samples/s |", "|---|---|---|---|---|---|"]
    for t in trt.get("timings", []):
        lines.append(f"| {t['engine']} | {t['batch_size']} | {t['gpu_ms_p50']:.4f} | {t['gpu_ms_p90']:.4f} | "
                     f"{t['gpu_ms_p99']:.4f} | {t['throughput']:.1f} |")
    return lines


def write_report(run_dir: Path, summary: dict) -> None:
    if summary.get("benchmark"):
        plot_latency(summary["benchmark"], Path(run_dir) / PLOT_NAME)
    atomic_write_text(Path(run_dir) / "report.md", render(summary))
