"""Lottery tickets (Frankle & Carbin 2019; Frankle et al. 2020): iterative magnitude pruning (IMP)
with rewinding, and the two controls that make a ticket claim testable.

Masks are the one mask system's ``<param>_mask`` buffers (:mod:`compress.sparsity.masks`); this module
only decides *which* weights they keep. Every trained level is a unit of work whose result and
masks are written atomically to a work directory, so a killed experiment resumes at the next
unfinished unit and reproduces what an uninterrupted run gives.
"""
from __future__ import annotations

import copy
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..modules import match_any, tensor_owner
from ..sparsity import masks as mask_core
from ..sparsity.masks import (Masks, current_masks, keep_largest, keep_largest_global, percent_remaining,
                              random_masks_like, set_masks)
from ..data import LoaderOptions, make_loader
from ..metrics import evaluate
from ..io import atomic_write_bytes, atomic_write_json, save_figure
from ..progress import log
from ..train.loop import train

CONTROLS = ("random_reinit", "random_prune")


# ---------------------------------------------------------------------------------------------
# Which tensors, which rates

def prunable_tensors(model: nn.Module, ignore=()) -> list[str]:
    """``<module>.weight`` of every Linear / Conv (weights with >= 2 dims) not matched by ``ignore``.
    Biases and norm parameters are never pruned (as in the paper)."""
    out = []
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(w, torch.Tensor) and w.dim() >= 2:
            name = f"{mname}.weight"
            if not match_any(name, ignore):
                out.append(name)
    return out


def rate_of(name: str, rate: float, rates: dict[str, float]) -> float:
    """The first pattern in ``rates`` that matches ``name`` wins; otherwise the default ``rate``."""
    for pattern, r in rates.items():
        if match_any(name, [pattern]):
            return r
    return rate


def magnitude_prune(model: nn.Module, masks: Masks, rate: float, rates: dict[str, float] | None = None,
                    scope: str = "layer", rounds: int = 1) -> Masks:
    """Remove, by |w|, the fraction of the weights that *remain* under ``masks``, ``rounds`` times
    compounded (one-shot pruning to the density ``rounds`` iterative rounds reach).

    ``scope="layer"``: each tensor loses its own rate (``rates`` patterns override ``rate``);
    ``scope="global"``: one ranking over all tensors in ``masks`` with ``rate``.
    """
    rates = rates or {}
    scores = {n: getattr(*tensor_owner(model, n)).detach().abs().cpu() for n in masks}
    if scope == "global":
        remaining = sum(int(m.sum()) for m in masks.values())
        return keep_largest_global(scores, masks, int(round(remaining * (1 - rate) ** rounds)))
    out = {}
    for n, m in masks.items():
        keep = int(round(int(m.sum()) * (1 - rate_of(n, rate, rates)) ** rounds))
        out[n] = keep_largest(scores[n], m, keep)
    return out


class ShuffledBatches:
    """Mini-batches of a dataset whose order depends only on ``(seed, epoch)``: training resumed at
    step k (rewinding, or a killed run) sees the batches an uninterrupted run sees. Read through a
    DataLoader (the data's worker settings) with this order as its batch sampler."""

    def __init__(self, dataset, batch_size: int, seed: int, options: LoaderOptions | None = None):
        self.dataset, self.batch_size, self.seed, self.epoch = dataset, batch_size, seed, 0
        self.options = options or LoaderOptions()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, len(self.dataset) // self.batch_size)

    def order(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        bs = min(self.batch_size, len(self.dataset))
        return [perm[i * bs: (i + 1) * bs].tolist() for i in range(len(self))]

    def __iter__(self):
        o = self.options
        kw = {"num_workers": o.num_workers, "pin_memory": o.pin_memory}
        if o.num_workers and o.prefetch_factor:
            kw["prefetch_factor"] = o.prefetch_factor
        yield from torch.utils.data.DataLoader(self.dataset, batch_sampler=self.order(), **kw)


@dataclass
class RewindState:
    """Weights (no mask buffers) and optimizer state at ``step``; step 0 has no optimizer state."""

    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict | None = None

    @classmethod
    def capture(cls, step: int, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> "RewindState":
        return cls(step, weights_of(model), copy.deepcopy(opt.state_dict()) if opt is not None else None)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items() if not k.endswith(mask_core.SUFFIX)}


def save_tensors(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_tensors(path: Path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# One trained level

@dataclass
class Evalsets:
    """Validation and test Datasets (evaluated in order, 1,000 items a batch)."""

    val: object
    test: object
    options: LoaderOptions | None = None

    def score(self, model: nn.Module, split: str, device) -> dict[str, float]:
        loader = make_loader(getattr(self, split), 1000, shuffle=False, options=self.options)
        return evaluate(model, loader, device=device)


@dataclass
class TrainPlan:
    """What training one level means: the loop config (``max_steps`` = total iterations), the
    batches, how often to evaluate, and the device."""

    loop: object
    batches: ShuffledBatches
    total: int
    eval_every: int
    device: torch.device | str = "cpu"


def train_level(net: nn.Module, plan: TrainPlan, evalsets: Evalsets, start: RewindState | None = None,
                capture_at: int | None = None, description: str = "level", extra_step=None):
    """Train ``net`` (weights and masks already set) from ``start``; evaluate the validation split
    every ``eval_every`` iterations and keep the weights at the minimum validation loss (early
    stopping), so the test split is evaluated only twice: at early stop and at the end.
    Returns ``(record, captured RewindState or None)``."""
    history: list[dict] = []
    captured: list[RewindState] = []
    best: dict = {}
    start_step = start.step if start is not None else 0

    def on_step(step: int, model: nn.Module, opt) -> None:
        if extra_step is not None:  # e.g. dynamic sparse training's mask updates
            extra_step(step, model, opt)
        if capture_at is not None and step == capture_at:
            captured.append(RewindState.capture(step, model, opt))
        if step % plan.eval_every == 0 or step == plan.total:
            v = evalsets.score(model, "val", plan.device)
            history.append({"iteration": step, "val_loss": round(v["loss"], 6), "val_accuracy": round(v["accuracy"], 4)})
            if not best or v["loss"] < best["val_loss"]:  # first minimum wins on ties
                best.update(iteration=step, val_loss=v["loss"], weights=weights_of(model))
            model.train()

    train(net, plan.batches, plan.loop, plan.device, description=description, on_step=on_step,
          start_step=start_step, optimizer_state=start.optimizer if start is not None else None)
    final = evalsets.score(net, "test", plan.device)["accuracy"]
    trained = weights_of(net)
    net.load_state_dict(best["weights"], strict=False)
    at_best = evalsets.score(net, "test", plan.device)["accuracy"]
    net.load_state_dict(trained, strict=False)  # the level's trained network is the final one
    record = {"early_stop_iteration": best["iteration"], "early_stop_test_accuracy": round(at_best, 4),
              "min_val_loss": round(best["val_loss"], 6), "final_test_accuracy": round(final, 4),
              "final_iteration": history[-1]["iteration"], "history": history}
    return record, (captured[0] if captured else None)


# ---------------------------------------------------------------------------------------------
# The experiment

@dataclass
class LotterySpec:
    """Plain settings (the stage's pydantic Config maps onto these)."""

    rounds: int
    rate: float = 0.2
    rates: dict[str, float] = field(default_factory=dict)
    scope: str = "layer"
    ignore: list[str] = field(default_factory=list)
    mode: str = "iterative"                 # or "one_shot"
    rewind_step: int = 0
    controls: list[str] = field(default_factory=list)
    control_rounds: list[int] | None = None  # default: every pruned level
    seed: int = 0
    method: str = "imp"                     # or snip | grasp | synflow (at init) or set | rigl (dynamic)
    dst_every: int = 100                    # set / rigl: steps between mask updates
    dst_alpha: float = 0.3                  # set / rigl: initial fraction updated (cosine-decayed)

    def levels(self) -> list[int]:
        """Level r = pruned r times. One-shot has only the dense level and the final one."""
        return list(range(self.rounds + 1)) if self.mode == "iterative" else [0, self.rounds]

    def controls_at(self, level: int) -> list[str]:
        if level == 0:
            return []
        if self.control_rounds is not None and level not in self.control_rounds:
            return []
        return list(self.controls)


@dataclass
class LotteryResult:
    rows: list[dict]
    ticket: nn.Module


def _unit_path(work: Path, level: int, variant: str) -> Path:
    return work / f"level-{level:02d}-{variant}.json"


def masks_path(work: Path, level: int) -> Path:
    """Level ``level``'s masks in a lottery work directory (:func:`compress.paths.lottery_dir`)."""
    return Path(work) / f"masks-{level:02d}.pt"


def init_path(work: Path) -> Path:
    """θ0, the weights every level rewinds to, in a lottery work directory."""
    return Path(work) / "init.pt"


def run_lottery(model: nn.Module, spec: LotterySpec, plan: TrainPlan, evalsets: Evalsets, work: Path,
                fresh_init: Callable[[int], nn.Module], init_batches=None,
                input_shape: tuple[int, ...] | None = None) -> LotteryResult:
    """Run IMP (and the controls) level by level; each finished unit is on disk in ``work``.

    ``model`` carries θ0 (its current weights). ``fresh_init(seed)`` builds a new model drawn from
    the same initial distribution (the random-reinit control). Order per level: the IMP unit
    (train, record, derive the next level's masks from the trained weights), then its controls.
    With ``spec.method`` a pruning-at-init method, every level's masks come from θ0 instead (at the
    density the IMP schedule reaches there; ``init_batches`` feed SNIP / GraSP).
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    names = prunable_tensors(model, spec.ignore)
    if not names:
        raise ValueError("no prunable tensors (every Linear/Conv weight matched `ignore`)")
    base = copy.deepcopy(model).cpu()
    for _, mod, pname, _m in list(mask_core.iter_masks(base)):
        mask_core.remove_mask(mod, pname)

    theta0 = init_path(work)
    if theta0.exists():  # the θ0 the first attempt used, whatever rebuilt the model since
        base.load_state_dict(load_tensors(theta0))
    else:
        save_tensors(theta0, weights_of(base))
    if not masks_path(work, 0).exists():
        save_tensors(masks_path(work, 0), current_masks(model, names))

    rewind_path = work / "rewind.pt"

    def load_rewind() -> RewindState:
        if spec.rewind_step == 0:
            return RewindState(0, weights_of(base), None)
        d = load_tensors(rewind_path)
        return RewindState(d["step"], d["weights"], d["optimizer"])

    def network(weights: dict, level_masks: Masks, source: nn.Module | None = None) -> nn.Module:
        net = copy.deepcopy(source if source is not None else base)
        net.load_state_dict(weights)
        set_masks(net, level_masks)
        return net.to(plan.device)

    levels = spec.levels()
    ticket: nn.Module | None = None
    for pos, level in enumerate(levels):
        level_masks = load_tensors(masks_path(work, level))
        pct = percent_remaining(level_masks)
        upath = _unit_path(work, level, spec.method)
        if not upath.exists():
            t0 = time.perf_counter()
            if level == 0 and spec.rewind_step > 0:  # late rewinding: θ_k comes from the dense run
                net = network(weights_of(base), level_masks)
                record, captured = train_level(net, plan, evalsets, None, capture_at=spec.rewind_step,
                                                description=f"level {level} imp")
                if captured is None:
                    raise ValueError(f"rewind step {spec.rewind_step} is past the end of training ({plan.total})")
                save_tensors(rewind_path, {"step": captured.step, "weights": captured.weights,
                                           "optimizer": captured.optimizer})
            else:
                start = load_rewind()
                net = network(start.weights, level_masks)
                dynamic = None
                if spec.method in ("set", "rigl") and level > 0:
                    from ..sparsity.dynamic import DynamicSparsity

                    it = iter(ShuffledBatches(plan.batches.dataset, plan.batches.batch_size, spec.seed + 1,
                                              plan.batches.options))
                    dynamic = DynamicSparsity(list(level_masks), spec.method, spec.dst_every,
                                              int(0.75 * plan.total), spec.dst_alpha, spec.seed + level,
                                              grad_batch=lambda: next(it))
                record, _ = train_level(net, plan, evalsets, start if start.step else None,
                                         description=f"level {level} {spec.method}", extra_step=dynamic)
            save_tensors(work / "ticket.pt", {"level": level, "weights": weights_of(net),  # masks: set/rigl move them
                                              "masks": current_masks(net, list(level_masks))})
            if pos + 1 < len(levels):
                nxt = levels[pos + 1]
                if spec.method == "imp":
                    new_masks = magnitude_prune(net, level_masks, spec.rate, spec.rates, spec.scope, rounds=nxt - level)
                else:  # masks that do not depend on this level's training, at the IMP schedule's density
                    ones = {n: torch.ones_like(m) for n, m in level_masks.items()}
                    schedule = magnitude_prune(base, ones, spec.rate, spec.rates, spec.scope, rounds=nxt)
                    if spec.method in ("set", "rigl"):  # random start mask, the schedule's per-layer density
                        new_masks = random_masks_like(schedule, spec.seed * 7919 + nxt + 1)
                    else:
                        from ..sparsity.at_init import prune_at_init

                        init_net = network(load_rewind().weights, ones)
                        new_masks = prune_at_init(init_net.cpu(), ones, spec.method,
                                                  percent_remaining(schedule) / 100, init_batches, input_shape)
                save_tensors(masks_path(work, nxt), new_masks)
            row = {"level": level, "variant": spec.method, "percent_remaining": round(pct, 3),
                   **record, "seconds": round(time.perf_counter() - t0, 2)}
            atomic_write_json(upath, row)  # written last: the unit counts as done only now
            log(f"  level {level} {spec.method}: {pct:.1f}% remaining, early-stop test acc "
                f"{row['early_stop_test_accuracy']:.2f} @ {row['early_stop_iteration']}")
        for variant in spec.controls_at(level):
            cpath = _unit_path(work, level, variant)
            if cpath.exists():
                continue
            t0 = time.perf_counter()
            if variant == "random_reinit":  # same mask, fresh weights; trains from iteration 0
                fresh = fresh_init(spec.seed * 7919 + level).cpu()
                net = network(weights_of(fresh), level_masks)
                record, _ = train_level(net, plan, evalsets, None, description=f"level {level} {variant}")
            elif variant == "random_prune":  # same per-layer density, random positions, original init
                start = load_rewind()
                net = network(start.weights, random_masks_like(level_masks, spec.seed * 7919 + level))
                record, _ = train_level(net, plan, evalsets, start if start.step else None,
                                         description=f"level {level} {variant}")
            else:
                raise ValueError(f"unknown control {variant!r}")
            row = {"level": level, "variant": variant, "percent_remaining": round(pct, 3),
                   **record, "seconds": round(time.perf_counter() - t0, 2)}
            atomic_write_json(cpath, row)
            log(f"  level {level} {variant}: early-stop test acc {row['early_stop_test_accuracy']:.2f} "
                f"@ {row['early_stop_iteration']}")

    saved = load_tensors(work / "ticket.pt")
    ticket = network(saved["weights"], saved["masks"])
    rows = [json.loads(p.read_text()) for p in sorted(work.glob("level-*.json"))]
    rows.sort(key=lambda r: (r["level"], ([spec.method, *CONTROLS]).index(r["variant"])))
    return LotteryResult(rows, ticket.eval())


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Two panels: early-stop test accuracy and early-stop iteration vs % weights remaining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    main = rows[0]["variant"]  # level 0: the dense run of the main method
    for variant in [main, *CONTROLS]:
        rs = sorted((r for r in rows if r["variant"] == variant or (r["level"] == 0 and variant != main)),
                    key=lambda r: -r["percent_remaining"])
        if not any(r["variant"] == variant for r in rs):
            continue
        x = [r["percent_remaining"] for r in rs]
        axes[0].plot(x, [r["early_stop_test_accuracy"] for r in rs], marker="o", label=variant)
        axes[1].plot(x, [r["early_stop_iteration"] for r in rs], marker="o", label=variant)
    for ax, ylabel in zip(axes, ["test accuracy at early stop (%)", "early-stop iteration"]):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("% weights remaining")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


