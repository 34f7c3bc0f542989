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


def plot_pareto(trials: list[dict], baselines: dict[str, dict], budget_ms: float | None, path: Path,
                title: str) -> None:
    """Trials (predicted latency vs proxy), their Pareto front, the baselines and the budget, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [t["predicted_ms"] for t in trials]
    ys = [t["proxy"] for t in trials]
    ax.scatter(xs, ys, s=12, c="#9bb", label="trials (predicted latency)")
    front = sorted(pareto_front(list(zip(ys, xs))), key=lambda i: xs[i])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", c="#157", ms=4, label="Pareto front")
    for name, b in baselines.items():
        ax.scatter([b["predicted_ms"]], [b["proxy"]], marker="*", s=140, label=name, zorder=5)
    if budget_ms:
        ax.axvline(budget_ms, ls="--", c="grey", lw=1, label="budget")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("accuracy proxy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


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
