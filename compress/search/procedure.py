"""Latency-aware per-group pruning-ratio search with Optuna: the procedure, in five phases.

The procedure (documented in benchmarks/results/search.md):

1. Budget: the per-layer latency table (cached per backend/batch/threads/machine), the predictor
   built on it and calibrated on the measured dense model; the budget in ms (or MACs).
2. Baselines, the lecture's way: bisect the uniform ratio and the global ratio that just meet the
   budget (predicted latency, or MACs).
3. Study: Optuna searches one ratio per prunable channel group (TPE for "accuracy proxy subject to
   the budget", NSGA-II for the two-objective Pareto front). The uniform and global solutions are
   enqueued as the first trials, so the search starts from them. A trial prunes a copy of the
   dense model, predicts its latency from the per-layer table (cheap), and only when it is within
   the budget pays for the accuracy proxy. Accuracy proxy ``finetune``: BatchNorm re-estimation and
   ``proxy.steps`` distillation steps from the dense teacher on training batches, then accuracy on
   a held-out validation split carved from the training set (never the test set).
   ``kept_importance`` (data-free, for latency-only studies): the fraction of the dense model's L2
   channel importance that the pruned model keeps.
4. Selection: the best ``top_k`` candidates (plus the fastest trial as good as the better
   baseline), the uniform and the global model are exported and timed end to end, interleaved
   (predicted vs measured), get the same short distilled fine-tune, and the candidate with the
   best validation accuracy within the measured budget is chosen.
5. Artifacts, in the stage directory: ``prune_block.yaml`` (a ``per_layer`` prune stage to paste
   into a recipe), ``pareto.png``, ``comparison.md`` and ``search.json``.

Storage: an Optuna RDB URL; a SQLite file in the run directory by default
(:func:`compress.paths.search_db`), so re-running continues the study, and a shared PostgreSQL URL
lets several machines work on one study. The latency table lives in the run directory too
(:func:`compress.paths.latency_table`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from .. import paths
from ..data import DataBundle, make_loader
from ..errors import InputError
from ..io import atomic_write_json, atomic_write_text
from ..metrics import count_macs
from ..progress import log
from ..train.config import DistillConfig, OptimizerConfig, TrainLoopConfig
from ..train.loop import train as train_loop
from .candidates import (Pruner, bisect_ratio, evaluate_on, feasible, kept_importance, make_study, measure_models,
                         model_row, recalibrate_batchnorm)
from .config import SearchConfig
from .latency_table import LatencyPredictor, LatencyTable
from .latency_target import SearchSeed, allocate_for_search
from .report import comparison_markdown, plot_pareto


@dataclass
class SearchInputs:
    """What the search needs from the pipeline, passed explicitly."""

    model: nn.Module                  # the model to search over (a copy is pruned; this one is left as is)
    teacher: nn.Module | None         # distillation teacher and proxy reference; None: ``model`` itself
    data: DataBundle                  # train split (proxy, fine-tune, held-out validation) and test split
    input_shape: tuple[int, ...]      # one sample, no batch dimension
    batch_size: int                   # training batch size of the proxy (and the fine-tune by default)
    seed: int                         # the stage's seed (:func:`compress.paths.stage_seed`)
    run_dir: Path                     # the study and the latency table live here (they outlive a re-run)
    stage_dir: Path                   # the artifacts (and the exported candidates under onnx/)
    run_name: str                     # default study name and report titles
    device: torch.device | str
    calibration: list                 # a few fixed training batches for data-aware importance criteria


@dataclass
class SearchOutcome:
    result: dict[str, Any]            # the ``search`` block of summary.json
    model: nn.Module                  # the chosen model, pruned and fine-tuned


@dataclass
class Budget:
    """Phase 1: latency table, predictor, the dense model's cost and the budget."""

    table: LatencyTable
    predictor: LatencyPredictor
    measured_now: int                 # table entries measured by this run (0: all came from the cache)
    table_seconds: float
    dense_ms: float                   # the dense model measured on its own
    dense_macs: int
    limit: float                      # ms or MACs
    cost: Callable[[nn.Module], float]
    desc: str

    def feasibility_limit(self, cfg: SearchConfig) -> float:
        """The trials' feasibility limit: a fraction of dense (latency) or MACs."""
        return cfg.budget if cfg.budget_metric == "latency" else self.limit


@dataclass
class Baselines:
    """Phase 2: uniform and global ratios that just meet the budget, and their models."""

    uniform_ratio: float
    global_ratio: float
    uniform: nn.Module
    global_: nn.Module


@dataclass
class StudyRun:
    """Phase 3: the Optuna study after this run's trials."""

    study: Any
    name: str
    storage: str
    done: list                        # completed trials (all runs)
    added: int                        # trials added by this run
    seconds: float


@dataclass
class Selection:
    """Phase 4: the measured, fine-tuned candidates and the chosen one."""

    rows: list[dict]                  # dense, uniform, global, searched-1..k
    models: dict[str, nn.Module]      # the pruned models by row name (not dense)
    chosen: dict                      # the chosen row
    fastest_name: str | None          # the fastest trial whose proxy reaches the better baseline's
    dense_measured_ms: float          # dense, measured interleaved with the candidates
    budget: float                     # re-anchored on that measurement (latency), else the MACs budget
    budget_desc: str
    block: dict                       # the per_layer prune stage that rebuilds the chosen model
    within_budget: bool               # the chosen model, as measured, meets the budget (+ tolerance)
    measured_ratio: float             # its measured latency (or MACs) over dense's


def storage_url(storage: str | None, run_dir: Path) -> str:
    """The study's RDB URL: ``storage``, or SQLite in the run directory."""
    return storage or f"sqlite:///{paths.search_db(run_dir).resolve()}"


class Search:
    """One search run. ``run()`` calls the phases in order; each returns what the next ones need."""

    def __init__(self, cfg: SearchConfig, inputs: SearchInputs):
        self.t_start = time.perf_counter()
        self.cfg, self.inputs = cfg, inputs
        self.device = inputs.device
        self.shape = tuple(inputs.input_shape)
        self.sdir, self.run_dir = Path(inputs.stage_dir), Path(inputs.run_dir)
        self.dense = copy.deepcopy(inputs.model).to(self.device).eval()
        self.teacher = inputs.teacher if inputs.teacher is not None else self.dense
        data = inputs.data
        self.rest, self.val = data.split_validation(min(cfg.proxy.val_size, len(data.train) // 4), inputs.seed + 11)
        self.test = data.test
        self.pruner = Pruner(self.dense, self.shape, cfg.importance, cfg.round_to, cfg.ignore, cfg.max_ratio,
                             inputs.calibration, self.device)
        if not self.pruner.groups:
            raise InputError("the model has no prunable channel groups", field="stages.search")
        self.proxy = self._proxy_fn()

    # -- helpers -------------------------------------------------------------------------------

    def _loader(self, batch_size: int | None, seed_offset: int):
        """Training batches without the held-out split."""
        return make_loader(self.rest.train_dataset(), batch_size or self.inputs.batch_size, shuffle=True,
                           seed=self.inputs.seed + seed_offset, drop_last=True, options=self.rest.loader)

    def _proxy_fn(self) -> Callable[[nn.Module], dict]:
        cfg, device, teacher = self.cfg, self.device, self.teacher
        if cfg.proxy.kind == "kept_importance":
            return lambda m: {"proxy": kept_importance(teacher, m)}
        loop = TrainLoopConfig(epochs=0, max_steps=max(1, cfg.proxy.steps),
                               optimizer=OptimizerConfig(lr=cfg.proxy.lr, momentum=0.9, schedule="constant"))
        distill = DistillConfig()

        def fn(model):
            m = copy.deepcopy(model)
            if cfg.proxy.bn_batches:
                recalibrate_batchnorm(m, self._loader(None, 303), cfg.proxy.bn_batches, device)
            if cfg.proxy.steps:
                train_loop(m, self._loader(None, 101), loop, device, teacher=teacher, distill=distill,
                           description="proxy")
            r = evaluate_on(m, self.val, device)
            return {"proxy": r["accuracy"], "proxy_loss": r["loss"]}

        return fn

    def _measure(self, models: dict[str, nn.Module]) -> dict[str, dict]:
        cfg = self.cfg
        return measure_models(models, self.shape, self.sdir / "onnx", cfg.backend, cfg.batch_size, cfg.threads,
                              cfg.measure.warmup, cfg.measure.iters, cfg.measure.rounds)

    def _ratios(self, trial) -> list[float]:
        return [round(trial.params[f"g{i}"], 4) for i in range(len(self.pruner.groups))]

    # -- phases --------------------------------------------------------------------------------

    def budget(self) -> Budget:
        """1. The latency table (cached per backend/batch/threads/machine), the predictor, the budget."""
        cfg, dense, shape = self.cfg, self.dense, self.shape
        table = LatencyTable(paths.latency_table(self.run_dir), cfg.backend, cfg.batch_size, cfg.threads)
        predictor = LatencyPredictor(dense, shape, table, self.pruner.prunable, cfg.grid)
        t0 = time.perf_counter()
        measured_now = predictor.warm(dense)
        table_s = time.perf_counter() - t0
        log(f"  latency table: {len(table.layers)} entries, {measured_now} measured now ({table_s:.1f} s)")
        dense_t = self._measure({"dense": dense})["dense"]["p50"]
        predictor.calibrate(dense, dense_t)
        dense_macs = count_macs(dense, shape)
        if cfg.budget_metric == "latency":
            limit = cfg.budget * dense_t
            cost = predictor.predict
            desc = (f"latency <= {cfg.budget:.2f} x dense ({limit:.3f} ms of {dense_t:.3f} ms, {cfg.backend}, "
                    f"batch {cfg.batch_size})")
        else:
            limit = cfg.budget * dense_macs

            def cost(m):
                return count_macs(m, shape)
            desc = f"MACs <= {cfg.budget:.2f} x dense ({int(limit):,} of {dense_macs:,})"
        return Budget(table, predictor, measured_now, table_s, dense_t, dense_macs, limit, cost, desc)

    def baselines(self, b: Budget) -> Baselines:
        """2. The lecture's baselines: uniform and global ratios that just meet the budget."""
        pruner, hi = self.pruner, self.cfg.max_ratio
        u_ratio, _ = bisect_ratio(lambda r: b.cost(pruner.prune("uniform", r)), b.limit, hi)
        g_ratio, _ = bisect_ratio(lambda r: b.cost(pruner.prune("global", r)), b.limit, hi)
        if self.cfg.budget_metric == "latency":
            u_ratio, g_ratio = self._fit_baselines(b, {"uniform": u_ratio, "global": g_ratio})
        uniform, global_ = pruner.prune("uniform", u_ratio), pruner.prune("global", g_ratio)
        log(f"  baselines: uniform ratio {u_ratio:.3f}, global ratio {g_ratio:.3f}")
        return Baselines(u_ratio, g_ratio, uniform, global_)

    def _fit_baselines(self, b: Budget, ratios: dict[str, float], refits: int = 2) -> tuple[float, float]:
        """Measure the table-bisected baselines end to end (interleaved with dense) and re-bisect each one
        whose measured ratio misses the budget by more than the tolerance, either way, with the table's
        limit corrected by that baseline's measured/predicted factor: the comparison with the allocator
        is at equal *measured* latency, not at equal table prediction (an isolated-layer table can be off
        by 30 % or more, and a baseline left far under the budget loses accuracy it did not have to).
        Keeps, per baseline, the measured ratio within the budget's tolerance closest to the budget."""
        cfg, pruner = self.cfg, self.pruner
        lo_ok, hi_ok = cfg.budget * (1 - cfg.latency_tolerance), cfg.budget * (1 + cfg.latency_tolerance)
        limits = {k: b.limit for k in ratios}
        tried: dict[str, list[tuple[float, float]]] = {k: [] for k in ratios}  # scope -> (measured, ratio)
        todo = dict(ratios)
        for attempt in range(refits + 1):
            models = {k: pruner.prune(k, r) for k, r in todo.items()}
            t = self._measure({"dense": self.dense, **models})
            nxt = {}
            for k, m in models.items():
                measured = t[k]["p50"] / t["dense"]["p50"]
                tried[k].append((measured, todo[k]))
                log(f"  baseline {k}: ratio {todo[k]:.3f} measured {measured:.3f} x dense")
                if lo_ok <= measured <= hi_ok or attempt == refits:
                    continue
                # the table predicted ``predicted`` where the model measures ``measured``: aim the table at
                # the budget corrected by that factor and bisect again
                correction = measured / max(1e-9, b.cost(m) / b.dense_ms)
                limits[k] = cfg.budget / correction * b.dense_ms
                r, _ = bisect_ratio(lambda r, k=k: b.cost(pruner.prune(k, r)), limits[k], cfg.max_ratio)
                if abs(r - todo[k]) > 1e-6:
                    nxt[k] = r
            todo = nxt
            if not todo:
                break
        def pick(k: str) -> float:
            within = [x for x in tried[k] if x[0] <= hi_ok]
            return (max(within) if within else min(tried[k]))[1]
        return pick("uniform"), pick("global")

    def allocation(self, b: Budget) -> SearchSeed | None:
        """2b. The latency allocator's solution, measured end to end and re-fit (latency budgets only):
        the study's first trial and a candidate of its own."""
        if self.cfg.budget_metric != "latency":
            return None

        def measure_many(models: dict[str, nn.Module]) -> dict[str, float]:
            return {k: v["p50"] for k, v in self._measure({"dense": self.dense, **models}).items()}

        def measure(m: nn.Module) -> tuple[float, float]:
            t = measure_many({"allocated": m})
            return t["dense"], t["allocated"]

        seed = allocate_for_search(self.pruner, b.predictor, self.cfg.budget, measure, self.cfg.latency_tolerance,
                                   cost=self.cfg.allocator_cost, log=log,
                                   measure_many=measure_many if self.cfg.allocator_refit_groups else None)
        a = seed.fit.last
        log(f"  allocator: {a.measured_ratio:.3f} x dense measured ({a.predicted_ratio:.3f} predicted) after "
            f"{len(seed.fit.attempts)} measurement(s)")
        return seed

    def study(self, b: Budget, base: Baselines, seed: SearchSeed | None = None) -> StudyRun:
        """3. The Optuna study: ``trials`` more trials, continuing whatever the storage holds."""
        import optuna

        cfg, pruner, shape, proxy = self.cfg, self.pruner, self.shape, self.proxy
        storage = storage_url(cfg.storage, self.run_dir)
        name = cfg.study_name or f"{self.inputs.run_name}-search"
        study = make_study(storage, name, cfg.objective, self.inputs.seed, cfg.budget_metric)
        n_groups = len(pruner.groups)
        step = cfg.ratio_step
        hi = round(math.floor(cfg.max_ratio / step + 1e-9) * step, 10)

        def snap(r: float) -> float:
            return min(hi, max(0.0, round(r / step) * step))

        before = len(study.trials)
        if before == 0:  # a fresh study starts from the allocator's solution and the lecture's two
            starts = ([seed.group_ratios] if seed is not None else []) + [[base.uniform_ratio] * n_groups,
                                                                         pruner.group_ratios_of(base.global_)]
            for rs in starts:
                study.enqueue_trial({f"g{i}": snap(r) for i, r in enumerate(rs)})

        def objective(trial):
            ratios = [trial.suggest_float(f"g{i}", 0.0, hi, step=step) for i in range(n_groups)]
            m = pruner.prune("per_layer", group_ratios=ratios)
            pred = b.predictor.predict(m)
            macs = count_macs(m, shape)
            trial.set_user_attr("predicted_ms", pred)
            trial.set_user_attr("predicted_rel", pred / b.dense_ms)  # vs dense: comparable across re-runs
            trial.set_user_attr("macs", macs)
            trial.set_user_attr("widths", pruner.widths(m))  # ratios that round to the same channels are one model
            over = ((pred / b.dense_ms - cfg.budget) / cfg.budget if cfg.budget_metric == "latency"
                    else (macs - b.limit) / b.limit)
            trial.set_constraint("budget", over)
            if cfg.objective == "constrained" and over > 0:
                trial.set_user_attr("proxy", 0.0)
                return 0.0  # infeasible: skip the (expensive) proxy; the constraint tells TPE why
            r = proxy(m)
            for k, v in r.items():
                trial.set_user_attr(k, v)
            return (r["proxy"], pred) if cfg.objective == "pareto" else r["proxy"]

        t0 = time.perf_counter()
        study.optimize(objective, n_trials=cfg.trials, n_jobs=cfg.workers, catch=())
        seconds = time.perf_counter() - t0
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        added = len(study.trials) - before
        log(f"  study {name}: {len(done)} trials ({added} added, {seconds:.1f} s)")
        return StudyRun(study, name, storage, done, added, seconds)

    def select(self, b: Budget, base: Baselines, st: StudyRun, seed: SearchSeed | None = None) -> Selection:
        """4. Top-k feasible candidates by proxy -> measured end to end, fine-tuned, one chosen."""
        cfg = self.cfg
        limit_key = b.feasibility_limit(cfg)
        feas = [t for t in st.done if feasible(t, cfg.budget_metric, limit_key)]
        feas.sort(key=lambda t: (-t.user_attrs.get("proxy", 0.0), t.user_attrs["predicted_rel"]))
        seen, top = set(), []
        for t in feas:
            key = tuple(t.user_attrs.get("widths", []))
            if key not in seen:
                seen.add(key)
                top.append((t, self._ratios(t)))
            if len(top) >= cfg.top_k:
                break
        if not top and seed is not None:
            # nothing fits by the table: measure the closest trials anyway (the table may be wrong), beside
            # the allocator's model; the measured budget decides (and the run's gate fails if none fits)
            for t in sorted(st.done, key=lambda t: t.user_attrs["predicted_rel"]):
                key = tuple(t.user_attrs.get("widths", []))
                if key not in seen and len(top) < cfg.top_k:
                    seen.add(key)
                    top.append((t, self._ratios(t)))
        if not top and seed is None:
            raise InputError(f"no trial met the budget ({b.desc}); raise budget or max_ratio",
                             field="stages.search.budget")
        # plus the fastest trial whose proxy is at least the better baseline's: "as accurate, how much faster?"
        base_proxy = {"uniform": self.proxy(base.uniform), "global": self.proxy(base.global_)}
        bar = max(v["proxy"] for v in base_proxy.values())
        fast = sorted((t for t in feas if t.user_attrs.get("proxy", -1.0) >= bar),
                      key=lambda t: t.user_attrs["predicted_rel"])
        if fast and tuple(fast[0].user_attrs.get("widths", [])) not in seen:
            top.append((fast[0], self._ratios(fast[0])))
        models = {"uniform": base.uniform, "global": base.global_}
        if seed is not None:  # the allocator's model, measured and re-fit: a candidate even when no trial fits
            models["allocated"] = seed.fit.model
        for j, (t, ratios) in enumerate(top):
            models[f"searched-{j + 1}"] = self.pruner.prune("per_layer", group_ratios=ratios)
        fastest_name = next((f"searched-{j + 1}" for j, (t, _) in enumerate(top)
                             if fast and t.number == fast[0].number), None)

        dense = self.dense
        timing = self._measure({"dense": dense, **models})
        # Re-anchor the predictor's one scalar on the models measured in *this* interleaved run (median of
        # measured / table sum over all of them, robust to one noisy model): the one-off dense measurement
        # at the start drifts with the machine's load. Relative differences stay the table's own.
        b.predictor.anchor({name: (m, timing[name]["p50"]) for name, m in {"dense": dense, **models}.items()})
        dense_ms = timing["dense"]["p50"]
        budget, budget_desc = b.limit, b.desc
        if cfg.budget_metric == "latency":
            budget = cfg.budget * dense_ms
            budget_desc = (f"latency <= {cfg.budget:.2f} x dense ({budget:.3f} ms of {dense_ms:.3f} ms "
                           f"measured with the candidates, {cfg.backend}, batch {cfg.batch_size})")

        rows = [{**model_row("dense", dense, self.shape, b.predictor), "measured_ms": dense_ms}]
        for name, m in models.items():
            row = model_row(name, m, self.shape, b.predictor)
            row["measured_ms"] = timing[name]["p50"]
            row["error_pct"] = 100.0 * (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
            row.update(base_proxy[name] if name in base_proxy else self.proxy(m))
            if name == fastest_name:
                row["fastest_at_baseline_proxy"] = True
            if name.startswith("searched"):
                t, ratios = top[int(name.split("-")[1]) - 1]
                row["trial"] = t.number
                row["group_ratios"] = ratios
            elif name == "allocated":
                row["group_ratios"] = seed.group_ratios
                row["widths"] = seed.widths
                row["allocator_attempts"] = [vars(a) for a in seed.fit.attempts]
                if seed.group_refit is not None:
                    row["group_refit"] = seed.group_refit
            elif name == "uniform":
                row["ratio"] = base.uniform_ratio
            else:
                row["ratio"] = base.global_ratio
            self._finetune_and_score(name, m, row)
            rows.append(row)
        if not cfg.data_free:
            rows[0]["val_accuracy"] = evaluate_on(dense, self.val, self.device)["accuracy"]
            rows[0]["test_accuracy"] = evaluate_on(dense, self.test, self.device)["accuracy"]

        limit = budget * (1 + cfg.latency_tolerance)
        searched = [r for r in rows if r["name"].startswith("searched") or r["name"] == "allocated"]
        within = [r for r in searched if (r["measured_ms"] if cfg.budget_metric == "latency" else r["macs"]) <= limit]
        score = "val_accuracy" if not cfg.data_free else "proxy"
        chosen = max(within or searched, key=lambda r: (r[score], -r["measured_ms"]))
        # the rule the run's gates read (compress.pipeline.gates): did the chosen model meet the budget as measured?
        measured_key = "measured_ms" if cfg.budget_metric == "latency" else "macs"
        dense_value = dense_ms if cfg.budget_metric == "latency" else b.dense_macs
        within_budget = bool(chosen[measured_key] <= limit)
        measured_ratio = chosen[measured_key] / dense_value
        if not within_budget:
            log(f"[yellow]  the chosen model measured {measured_ratio:.3f} x dense, over the budget {cfg.budget} x "
                f"dense (+{cfg.latency_tolerance:.0%}): the run's gates fail[/]")
        block = {"kind": "prune", "importance": cfg.importance, "scope": "per_layer", "ratio": 0.0,
                 "round_to": cfg.round_to, "max_ratio": cfg.max_ratio,
                 "ratios": self.pruner.per_layer_block(chosen["group_ratios"])}
        if cfg.ignore is not None:
            block["ignore"] = cfg.ignore
        return Selection(rows, models, chosen, fastest_name, dense_ms, budget, budget_desc, block, within_budget,
                         measured_ratio)

    def _finetune_and_score(self, name: str, model: nn.Module, row: dict) -> None:
        """The same short (distilled) fine-tune for every candidate, then validation and test accuracy."""
        cfg, device = self.cfg, self.device
        if cfg.data_free:
            return
        ft = cfg.finetune
        if ft is not None:
            train_loop(model, self._loader(ft.batch_size, 202), ft, device,
                       teacher=self.teacher if ft.distill else None, distill=ft.distill,
                       description=f"finetune {name}")
        row["val_accuracy"] = evaluate_on(model, self.val, device)["accuracy"]
        row["test_accuracy"] = evaluate_on(model, self.test, device)["accuracy"]

    def write_artifacts(self, b: Budget, base: Baselines, st: StudyRun, sel: Selection) -> dict[str, Any]:
        """5. prune_block.yaml, pareto.png, comparison.md and search.json in the stage directory; the
        latency table in the run directory. Returns the summary block."""
        cfg, sdir, run_name = self.cfg, self.sdir, self.inputs.run_name
        limit_key = b.feasibility_limit(cfg)
        # one x scale for every point: cost / dense. Latency: the per-layer table's sum for the model over
        # its sum for the dense model (what the trials were judged by; the calibration scale cancels),
        # and, for the measured candidates, measured / dense measured in the same interleaved run.
        latency = cfg.budget_metric == "latency"
        dense_row = sel.rows[0]
        trial_pts = [{"number": t.number, "predicted_rel": t.user_attrs["predicted_rel"],
                      "predicted_ms": t.user_attrs["predicted_rel"] * sel.dense_measured_ms,
                      "macs": t.user_attrs["macs"], "proxy": t.user_attrs.get("proxy", 0.0),
                      "feasible": feasible(t, cfg.budget_metric, limit_key),
                      "x": t.user_attrs["predicted_rel"] if latency else t.user_attrs["macs"] / b.dense_macs}
                     for t in st.done if "proxy" in t.user_attrs]
        plotted = [p for p in trial_pts if cfg.objective == "pareto" or p["feasible"]] or trial_pts
        cands = {r["name"]: {"predicted": (r["predicted_ms"] / dense_row["predicted_ms"] if latency
                                           else r["macs"] / b.dense_macs),
                             "measured": r["measured_ms"] / dense_row["measured_ms"] if latency else None,
                             "proxy": r.get("proxy", 0.0)}
                 for r in sel.rows[1:]}
        x_label = (f"latency / dense on {cfg.backend}, batch {cfg.batch_size} (predicted: per-layer latency table "
                   "sum; measured: end to end, interleaved)" if latency else "MACs / dense")
        plot = plot_pareto(plotted, cands, cfg.budget, sdir / "pareto.png",
                           f"{run_name}: {cfg.objective} search ({len(st.done)} trials)", x_label)
        atomic_write_text(sdir / "prune_block.yaml", "# searched per-layer ratios: paste under stages:\n"
                          + yaml.safe_dump([sel.block], sort_keys=False))
        md = comparison_markdown(sel.rows, sel.budget_desc)
        atomic_write_text(sdir / "comparison.md", f"# search: {run_name}\n\n{md}\nchosen: {sel.chosen['name']}\n")
        errors = [abs(r["error_pct"]) for r in sel.rows if "error_pct" in r]
        result = {
            "budget": sel.budget, "budget_metric": cfg.budget_metric, "budget_desc": sel.budget_desc,
            "dense_ms": b.dense_ms, "objective": cfg.objective, "study": st.name, "storage": st.storage,
            "trials_total": len(st.done), "trials_added": st.added, "search_seconds": st.seconds,
            "table": {"file": paths.latency_table(self.run_dir).name, "key": b.table.key,
                      "entries": len(b.table.layers), "measured_now": b.measured_now, "seconds": b.table_seconds},
            "predictor_scale": b.predictor.scale,
            "predictor_abs_error_pct_median": sorted(errors)[len(errors) // 2],
            "uniform_ratio": base.uniform_ratio, "global_ratio": base.global_ratio, "rows": sel.rows,
            "chosen": sel.chosen["name"], "within_budget": sel.within_budget, "measured_ratio": sel.measured_ratio,
            "budget_ratio": cfg.budget, "tolerance": cfg.latency_tolerance,
            "budget_limit_ratio": cfg.budget * (1 + cfg.latency_tolerance),
            "fastest_at_baseline_proxy": sel.fastest_name, "prune_block": sel.block,
            "seconds": time.perf_counter() - self.t_start,
        }
        atomic_write_json(sdir / "search.json", {**result, "trials": trial_pts, "plot": plot})
        b.table.save()
        return result

    def run(self) -> SearchOutcome:
        b = self.budget()
        base = self.baselines(b)
        seed = self.allocation(b)
        st = self.study(b, base, seed)
        sel = self.select(b, base, st, seed)
        result = self.write_artifacts(b, base, st, sel)
        return SearchOutcome(result, sel.models[sel.chosen["name"]])


def run_search(cfg: SearchConfig, inputs: SearchInputs) -> SearchOutcome:
    """Search per-group pruning ratios for the best accuracy within a latency (or MACs) budget."""
    return Search(cfg, inputs).run()
