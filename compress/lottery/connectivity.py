"""Linear mode connectivity (Frankle et al. 2020): error along the straight line between two
networks, and instability = the error barrier between two copies trained from the same θ_k with
different data orders. barrier = max error on the path − mean of the two endpoint errors.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..sparsity import masks as mask_core
from .experiment import RewindState, ShuffledBatches, weights_of
from ..data import DataConfig, build_data, make_loader
from ..errors import InputError
from ..io import atomic_write_json, save_figure
from ..metrics import evaluate
from ..train.loop import train

INTERPOLATION_RESULT = "interpolation.json"
INTERPOLATION_PLOT = "interpolation.png"


def _plain(model: nn.Module) -> nn.Module:
    """A copy without mask buffers: interpolated weights are whatever the line gives."""
    net = copy.deepcopy(model).cpu()
    for _, mod, pname, _m in list(mask_core.iter_masks(net)):
        mask_core.remove_mask(mod, pname)
    return net


def interpolation_curve(model_a: nn.Module, model_b: nn.Module, dataset, points: int = 30,
                        device: torch.device | str = "cpu") -> list[dict]:
    """Test error (%) and loss at ``points`` evenly spaced α in [0, 1] of (1 − α)·θ_a + α·θ_b.
    Both models must have the same architecture (pruned weights are zeros, so dense ↔ sparse works)."""
    wa, wb = weights_of(model_a), weights_of(model_b)
    if wa.keys() != wb.keys():
        only = sorted(set(wa) ^ set(wb))[:3]
        raise InputError(f"the two networks have different parameters (e.g. {', '.join(only)}): interpolation "
                         "needs the same architecture (dense vs masked works; dense vs channel-pruned does not)",
                         field="checkpoint")
    bad = next((k for k in wa if wa[k].shape != wb[k].shape), None)
    if bad is not None:
        raise InputError(f"the two networks differ in shape at {bad} ({tuple(wa[bad].shape)} vs "
                         f"{tuple(wb[bad].shape)}): interpolation needs the same architecture (dense vs masked "
                         "works; dense vs channel-pruned does not)", field="checkpoint")
    net = _plain(model_a).to(device)
    curve = []
    for i in range(points):
        alpha = i / (points - 1) if points > 1 else 0.0
        mixed = {k: torch.lerp(wa[k].float(), wb[k].float(), alpha).to(wa[k].dtype)
                 if wa[k].is_floating_point() else wa[k] for k in wa}
        net.load_state_dict(mixed)
        ev = evaluate(net, make_loader(dataset, 1000, shuffle=False), device=device)
        curve.append({"alpha": round(alpha, 6), "error": round(100.0 - ev["accuracy"], 4), "loss": round(ev["loss"], 6)})
    return curve


def barrier(curve: list[dict]) -> float:
    """max error along the path − mean of the endpoint errors (percentage points)."""
    return max(c["error"] for c in curve) - 0.5 * (curve[0]["error"] + curve[-1]["error"])


class _Reached(Exception):
    pass


def state_at(net: nn.Module, step: int, loop_cfg, batches, device: torch.device | str = "cpu") -> RewindState:
    """θ_k: train a copy of ``net`` under the full run's config (so the LR schedule is the full
    run's) and stop at ``step``, returning weights and optimizer state there."""
    captured: list[RewindState] = []

    def on_step(s: int, model: nn.Module, opt) -> None:
        if s == step:
            captured.append(RewindState.capture(s, model, opt))
            raise _Reached  # the rest of the parent run is not needed

    try:
        train(copy.deepcopy(net).to(device), batches, loop_cfg, device, description="to θ_k", on_step=on_step)
    except _Reached:
        pass
    if not captured:
        raise ValueError(f"step {step} is past the end of training")
    return captured[0]


def train_two_copies(net: nn.Module, start: RewindState | None, loop_cfg, dataset,
                     batch_size: int, seeds: tuple[int, int] = (1, 2),
                     device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module]:
    """Train two copies of ``net`` (weights and masks set) from ``start`` to ``loop_cfg.max_steps``
    with different data orders (SGD noise): the instability experiment's two children."""
    children = []
    for s in seeds:
        child = copy.deepcopy(net)
        if start is not None:  # weights at θ_k (mask buffers stay those of ``net``)
            child.load_state_dict(start.weights, strict=False)
        child.to(device)
        train(child, ShuffledBatches(dataset, batch_size, s), loop_cfg, device, description=f"copy {s}",
              start_step=start.step if start is not None else 0,
              optimizer_state=start.optimizer if start is not None else None)
        children.append(child.eval())
    return children[0], children[1]


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, curve in curves.items():
        ax.plot([c["alpha"] for c in curve], [c["error"] for c in curve], marker=".",
                label=f"{label} (barrier {barrier(curve):.2f} pp)")
    ax.set_xlabel("interpolation α")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def interpolate(model_a: nn.Module, model_b: nn.Module, data: DataConfig, input_shape, seed: int,
                out: str | Path, *, points: int = 30, names: tuple[str, str] = ("a", "b"),
                label: str | None = None) -> dict:
    """The error curve between two networks on the test split of ``data`` (built with ``seed``,
    as a run with that seed builds it); write ``interpolation.json`` and ``interpolation.png``
    under ``out`` and return the JSON's content: ``a``, ``b`` (``names``: where the models came
    from), ``points``, ``barrier`` (percentage points) and ``curve``. ``label``: the plot's legend
    (default ``"<a> -> <b>"``)."""
    bundle = build_data(data, tuple(input_shape) if input_shape else None, seed)
    curve = interpolation_curve(model_a, model_b, bundle.test, points)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"a": names[0], "b": names[1], "points": points, "barrier": barrier(curve), "curve": curve}
    atomic_write_json(out / INTERPOLATION_RESULT, res)
    plot_curves({label or f"{names[0]} -> {names[1]}": curve}, out / INTERPOLATION_PLOT)
    return res
