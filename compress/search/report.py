"""The search's report: the Pareto plot of the trials and the comparison table (markdown)."""
from __future__ import annotations

from pathlib import Path

from ..io import save_figure


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (accuracy up, latency down) that no other point dominates."""
    front = []
    for i, (a, t) in enumerate(points):
        if not any((a2 >= a and t2 <= t) and (a2 > a or t2 < t) for a2, t2 in points):
            front.append(i)
    return front


def plot_pareto(trials: list[dict], candidates: dict[str, dict], budget: float | None, path: Path, title: str,
                x_label: str) -> dict:
    """Trials, their Pareto front, the measured candidates and the budget on ONE x scale: each point's
    cost as a fraction of the dense model's (``trials[i]["x"]``; a candidate's ``predicted`` -- the
    same proxy as the trials -- and ``measured``). Returns the plotted data (what search.json keeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    xs = [t["x"] for t in trials]
    ys = [t["proxy"] for t in trials]
    ax.scatter(xs, ys, s=12, c="#9bb", label="trials (predicted)")
    front = sorted(pareto_front(list(zip(ys, xs))), key=lambda i: xs[i])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", c="#157", ms=4, label="Pareto front")
    markers = {"uniform": "s", "global": "^", "allocated": "*"}
    for name, c in candidates.items():
        m = markers.get(name, "D")
        ax.scatter([c["predicted"]], [c["proxy"]], marker=m, s=90, zorder=5, label=f"{name} (predicted)")
        if c.get("measured") is not None:
            ax.scatter([c["measured"]], [c["proxy"]], marker=m, s=90, zorder=5, facecolors="none",
                       edgecolors="k", label=f"{name} (measured)")
    if budget:
        ax.axvline(budget, ls="--", c="grey", lw=1, label="budget")
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel("accuracy proxy")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)
    return {"x_label": x_label, "budget": budget, "trials": [[x, y] for x, y in zip(xs, ys)],
            "front": [[xs[i], ys[i]] for i in front], "candidates": candidates}


def comparison_markdown(rows: list[dict], budget_desc: str) -> str:
    """One table row per model: MACs, params, predicted vs measured latency, proxy and accuracies."""
    lines = [f"Budget: {budget_desc}", "",
             "| model | MACs | params | predicted ms | measured ms (p50) | error % | proxy | val acc % | test acc % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def f(k, fmt):
            v = r.get(k)
            return format(v, fmt) if v is not None else "-"
        lines.append(f"| {r['name']} | {r['macs']:,} | {r['params']:,} | {f('predicted_ms', '.3f')} | "
                     f"{f('measured_ms', '.3f')} | {f('error_pct', '+.1f')} | {f('proxy', '.2f')} | "
                     f"{f('val_accuracy', '.2f')} | {f('test_accuracy', '.2f')} |")
    return "\n".join(lines) + "\n"
