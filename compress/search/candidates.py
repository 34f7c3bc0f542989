"""The search's building blocks: pruning copies of the dense model (:class:`Pruner`), the
baselines' ratio bisection, the accuracy proxies, end-to-end measurement of candidates, the Optuna
study and its feasibility test. The procedure that uses them is :mod:`compress.search.procedure`.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..structured import pruner
from ..structured.criteria import IMPORTANCES, calibrate as calibrate_criterion
from ..deploy.backends import BACKENDS
from ..deploy.timing import time_interleaved
from .latency_table import LatencyPredictor
from ..data import make_loader
from ..example_inputs import example_input
from ..modules import out_width
from ..metrics import batch_inputs, call_model, count_macs, count_params, evaluate, to_device
from ..deploy.onnx_io import export_onnx


class Pruner:
    """Prunes copies of one dense model: uniform, global or per-group ratios."""

    def __init__(self, dense: nn.Module, input_shape, importance: str = "l2", round_to: int | None = 8,
                 ignore=None, max_ratio: float = 0.9, calibration=None, device="cpu"):
        self.dense = dense.eval()
        self.input_shape = tuple(input_shape)
        self.importance = importance
        self.round_to = round_to
        self.ignore = ignore
        self.max_ratio = max_ratio
        self.calibration = calibration or []
        self.device = device
        self.example = example_input(dense, self.input_shape, 1, seed=None, device=device)
        self.groups = pruner.describe_groups(dense, self.example, ignore)
        self.reference = pruner.channel_counts(dense, self.example)
        self.prunable = {m for g in self.groups for m in g["members"]}
        mods = dict(dense.named_modules())
        # every out-side Conv/Linear of a group carries the group's ratio: Torch-Pruning reads the
        # ratio of whichever of them it meets first
        self.group_layers = [[m[:-4] for m in g["members"] if m.endswith(".out")
                              and isinstance(mods.get(m[:-4]), (nn.Conv2d, nn.Linear))] for g in self.groups]

    def per_layer_block(self, group_ratios: list[float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for names, r in zip(self.group_layers, group_ratios):
            if r > 0:
                for n in names:
                    out[n] = round(float(r), 4)
        return out

    def prune(self, scope: str, ratio: float = 0.0, group_ratios: list[float] | None = None) -> nn.Module:
        model = copy.deepcopy(self.dense)
        per_layer = self.per_layer_block(group_ratios) if group_ratios is not None else None
        if scope == "per_layer" and not per_layer:
            return model
        crit = IMPORTANCES.get(self.importance, field="importance")
        imp = crit.build()
        # the prune stage's own pruner and default guards, so a pasted per_layer block rebuilds this model
        gp = pruner.GuardedPruner(model, self.example, imp, ratio=ratio if scope != "per_layer" else 0.0,
                                   scope=scope, per_layer=per_layer, ignore=self.ignore,
                                   guards=pruner.Guards(round_to=self.round_to), max_ratio=self.max_ratio,
                                   reference=self.reference)
        calibrate_criterion(crit, imp, model, self.calibration if (crit.needs or crit.calibrate) else [], self.device)
        gp.step()
        model.zero_grad(set_to_none=True)
        return model.eval()

    def widths(self, model: nn.Module) -> list[int]:
        """Channels left in each group of ``model``."""
        mods = dict(model.named_modules())
        out = []
        for names in self.group_layers:
            out.append(out_width(mods[names[0]]))
        return out

    def group_ratios_of(self, model: nn.Module) -> list[float]:
        """Per-group fraction of channels removed in ``model`` (to replay a global solution)."""
        mods_d, mods_p = dict(self.dense.named_modules()), dict(model.named_modules())
        out = []
        for names in self.group_layers:
            n = names[0]
            out.append(1.0 - out_width(mods_p[n]) / out_width(mods_d[n]))
        return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, batches: int, device) -> None:
    """Adaptive BatchNorm (Li et al., EagleEye, ECCV 2020): re-estimate running statistics of the
    pruned network on a few training batches. Pruning leaves BN statistics of the dense network;
    re-estimated, held-out accuracy ranks sub-networks like their fine-tuned accuracy does."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        call_model(model, to_device(batch_inputs(batch), device))  # a tensor, tuple or dict of inputs
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def kept_importance(dense: nn.Module, pruned: nn.Module) -> float:
    """Data-free proxy: sum over layers of the kept filters' L2 norms / the dense sum, averaged."""
    dm, pm = dict(dense.named_modules()), dict(pruned.named_modules())
    fracs = []
    for name, d in dm.items():
        if isinstance(d, nn.Conv2d) and name in pm:
            p = pm[name]
            fracs.append(p.weight.detach().pow(2).sum().item() / max(1e-12, d.weight.detach().pow(2).sum().item()))
    return 100.0 * sum(fracs) / max(1, len(fracs))


def bisect_ratio(fn_cost: Callable[[float], float], budget: float, hi: float, coarse: float = 0.1,
                 iters: int = 4) -> tuple[float, float]:
    """Smallest ratio in [0, hi] whose cost is <= budget; returns (ratio, cost).

    Not a plain bisection over [0, hi]: the cost is not monotone near the top, because Torch-Pruning
    skips a group that ``round_to`` would empty (a 64-channel group at 0.9 with round_to 8 keeps all
    64). So: a coarse scan upward for the first feasible ratio, then bisection inside that step.
    If nothing is feasible, the ratio with the lowest cost."""
    prev, best_any = 0.0, None
    r = 0.0
    while r <= hi + 1e-9:
        c = fn_cost(r)
        if best_any is None or c < best_any[1]:
            best_any = (r, c)
        if c <= budget:
            lo, up, best = prev, r, (r, c)
            if r == 0.0:
                return best
            for _ in range(iters):
                mid = (lo + up) / 2
                cm = fn_cost(mid)
                if cm <= budget:
                    up, best = mid, (mid, cm)
                else:
                    lo = mid
            return best
        prev, r = r, round(r + coarse, 10)
    return best_any


def measure_models(models: dict[str, nn.Module], input_shape, directory: Path, backend: str, batch_size: int,
                   threads: int, warmup: int, iters: int, rounds: int) -> dict[str, dict]:
    """Export each model and time them all against each other, interleaved (medians)."""
    factory = BACKENDS.get(backend)
    runners = {}
    for name, m in models.items():
        # TorchScript first: candidates are exported by the dozen and the dynamo exporter takes
        # several times longer; ONNX Runtime runs the two files' graphs alike after its own fusions
        path = export_onnx(copy.deepcopy(m), input_shape, directory / f"{name}.onnx", exporter="torchscript")
        runners[name] = factory(path, m, input_shape, batch_size, {"threads": threads})
    return time_interleaved(runners, warmup=warmup, iters=iters, rounds=rounds)


def make_study(storage: str, study_name: str, mode: str, seed: int, budget_key: str | None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if mode == "pareto":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
        directions = ["maximize", "minimize"]
    else:
        # the budget violation is reported per trial with trial.set_constraint (<= 0: feasible)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True)
        directions = ["maximize"]
    return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, directions=directions,
                               load_if_exists=True)


def feasible(trial, budget_metric: str, limit: float) -> bool:
    """Latency: predicted/dense <= ``limit`` (a fraction); MACs: macs <= ``limit``."""
    key = "predicted_rel" if budget_metric == "latency" else "macs"
    return trial.user_attrs.get(key, math.inf) <= limit + 1e-12


def model_row(name: str, model: nn.Module, input_shape, predictor: LatencyPredictor) -> dict:
    return {"name": name, "macs": count_macs(model, input_shape), "params": count_params(model),
            "predicted_ms": predictor.predict(model)}


def evaluate_on(model, split, device) -> dict:
    if split is None:
        return {}
    return evaluate(model, make_loader(split, 256, shuffle=False), device=device)
