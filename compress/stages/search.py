"""``search``: latency-aware per-group pruning ratios, searched with Optuna on the target backend.

See compress/search/ for the procedure. The stage leaves the chosen (pruned, fine-tuned)
model in ``ctx.model`` and writes, in its stage directory: ``prune_block.yaml`` (a ``per_layer``
prune stage to paste into a recipe), ``pareto.png``, ``comparison.md`` and ``search.json``.
The Optuna study and the latency table live in the run directory itself so that they survive a
re-run (the runner clears a stage directory that did not finish).
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import yaml
from pydantic import Field, field_validator, model_validator

from .base import StageConfig
from ..config import Strict
from ..structured.criteria import IMPORTANCES
from ..search import candidates as S
from ..deploy.backends import BACKENDS
from ..search.latency_table import LatencyPredictor, LatencyTable
from ..io import atomic_write_json, atomic_write_text
from ..progress import log
from ..train.loop import train as train_loop
from ..data import make_loader
from ..errors import InputError
from ..paths import latency_table, search_db
from .artifacts import MASKS
from .base import StageOutput, register_stage
from .finetune import FinetuneBlock


class ProxyConfig(Strict):
    kind: Literal["finetune", "kept_importance"] = Field(
        "finetune", description="finetune: BatchNorm re-estimation + a few distilled steps, then held-out "
                                "accuracy; kept_importance: data-free")
    bn_batches: int = Field(10, ge=0, description="training batches to re-estimate BatchNorm statistics")
    steps: int = Field(0, ge=0, description="distillation steps after the BatchNorm re-estimation")
    lr: float = Field(0.01, gt=0)
    val_size: int = Field(512, ge=16, description="held-out examples carved from the training split")


class MeasureConfig(Strict):
    warmup: int = Field(5, ge=0)
    iters: int = Field(40, ge=1)
    rounds: int = Field(4, ge=1)


class Config(StageConfig):
    kind: Literal["search"] = "search"
    changes_structure: ClassVar[bool] = True
    objective: Literal["constrained", "pareto"] = Field(
        "constrained", description="constrained: best proxy within the budget (TPE); pareto: NSGA-II front")
    budget_metric: Literal["latency", "macs"] = "latency"
    budget: float = Field(0.5, gt=0, lt=1, description="fraction of the dense model's latency (or MACs)")
    trials: int = Field(30, ge=1, description="trials added to the study by this run")
    workers: int = Field(1, ge=1, description="parallel trials in this process (Optuna n_jobs)")
    storage: Optional[str] = Field(None, description="Optuna RDB URL; default sqlite:///<run dir>/search.db")
    study_name: Optional[str] = None
    importance: str = "l2"
    round_to: Optional[int] = Field(8, ge=1)
    ignore: Optional[list[str]] = None
    max_ratio: float = Field(0.8, gt=0, lt=1, description="upper bound of every group's ratio")
    ratio_step: float = Field(0.05, gt=0, lt=1)
    backend: str = "onnxruntime"
    batch_size: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    grid: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
                              description="width fractions measured per layer")
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    top_k: int = Field(3, ge=1, description="candidates that get the real fine-tune")
    finetune: Optional[FinetuneBlock] = Field(
        default_factory=lambda: FinetuneBlock(epochs=1, distill={"alpha": 0.7, "temperature": 4.0}),
        description="the same fine-tune for uniform, global and the top candidates; null skips it")
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    latency_tolerance: float = Field(0.05, ge=0, description="measured latency may exceed the budget by this fraction")
    apply: bool = Field(True, description="leave the chosen model in the pipeline")

    @field_validator("backend", "importance")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        registry = BACKENDS if info.field_name == "backend" else IMPORTANCES
        try:
            registry.get(v)
        except InputError as exc:  # the registry's own one-line message, as a field error
            raise ValueError(str(exc)) from None
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("width fractions must be in (0, 1]")
        return sorted(set(v))

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and "://" not in v:
            raise ValueError("must be an RDB URL such as sqlite:///search.db or postgresql://host/db")
        return v

    def conflicts(self) -> dict[str, str]:
        return {MASKS: "searching channel widths after weight masks were set drops the masks; search before "
                       "sparsify or lottery"}

    @model_validator(mode="after")
    def _step(self):
        if self.ratio_step > self.max_ratio:
            raise ValueError("ratio_step must not exceed max_ratio")
        return self


def _proxy_fn(cfg: Config, loader, teacher, val, device):
    if cfg.proxy.kind == "kept_importance":
        return lambda m: {"proxy": S.kept_importance(teacher, m)}
    from ..train.config import DistillConfig, OptimizerConfig, TrainLoopConfig

    loop = TrainLoopConfig(epochs=0, max_steps=max(1, cfg.proxy.steps),
                           optimizer=OptimizerConfig(lr=cfg.proxy.lr, momentum=0.9, schedule="constant"))
    distill = DistillConfig()

    def fn(model):
        m = copy.deepcopy(model)
        if cfg.proxy.bn_batches:
            S.recalibrate_batchnorm(m, loader(None, 303), cfg.proxy.bn_batches, device)
        if cfg.proxy.steps:
            train_loop(m, loader(None, 101), loop, device, teacher=teacher, distill=distill,
                       description="proxy")
        r = S.evaluate_on(m, val, device)
        return {"proxy": r["accuracy"], "proxy_loss": r["loss"]}

    return fn


def _storage_url(cfg: Config, run_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{search_db(run_dir).resolve()}"


@register_stage("search", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Search per-group pruning ratios for the best accuracy within a latency (or MACs) budget."""
    t_start = time.perf_counter()
    device = ctx.device
    dense = copy.deepcopy(ctx.model).to(device).eval()
    teacher = ctx.dense if ctx.dense is not None else dense
    shape = ctx.input_shape
    sdir = Path(ctx.stage_dir)
    run_dir = Path(ctx.run_dir)
    data_free = cfg.proxy.kind == "kept_importance"
    rest, val = ctx.data.split_validation(min(cfg.proxy.val_size, len(ctx.data.train_x) // 4), ctx.seed + 11)

    def loader(batch_size, seed_offset):  # training batches without the held-out split
        return make_loader(rest.train_x, rest.train_y, batch_size or ctx.batch_size, shuffle=True,
                           seed=ctx.seed + seed_offset, drop_last=True)

    pruner = S.Pruner(dense, shape, cfg.importance, cfg.round_to, cfg.ignore, cfg.max_ratio,
                      ctx.calibration_batches(4), device)
    if not pruner.groups:
        raise InputError("the model has no prunable channel groups", field="stages.search")

    # 1. latency table (cached per backend/batch/threads/machine) and the predictor
    table = LatencyTable(latency_table(run_dir), cfg.backend, cfg.batch_size, cfg.threads)
    predictor = LatencyPredictor(dense, shape, table, pruner.prunable, cfg.grid)
    t0 = time.perf_counter()
    measured_now = predictor.warm(dense)
    table_s = time.perf_counter() - t0
    log(f"  latency table: {len(table.layers)} entries, {measured_now} measured now ({table_s:.1f} s)")
    dense_t = S.measure_models({"dense": dense}, shape, sdir / "onnx", cfg.backend, cfg.batch_size, cfg.threads,
                               cfg.measure.warmup, cfg.measure.iters, cfg.measure.rounds)["dense"]["p50"]
    predictor.calibrate(dense, dense_t)
    dense_macs = S.count_macs(dense, shape)
    if cfg.budget_metric == "latency":
        budget = cfg.budget * dense_t
        cost = predictor.predict
        budget_desc = f"latency <= {cfg.budget:.2f} x dense ({budget:.3f} ms of {dense_t:.3f} ms, {cfg.backend}, batch {cfg.batch_size})"
    else:
        budget = cfg.budget * dense_macs
        def cost(m):
            return S.count_macs(m, shape)
        budget_desc = f"MACs <= {cfg.budget:.2f} x dense ({int(budget):,} of {dense_macs:,})"

    # 2. the lecture's baselines: uniform and global ratios that just meet the budget
    u_ratio, _ = S.bisect_ratio(lambda r: cost(pruner.prune("uniform", r)), budget, cfg.max_ratio)
    g_ratio, _ = S.bisect_ratio(lambda r: cost(pruner.prune("global", r)), budget, cfg.max_ratio)
    uniform, global_ = pruner.prune("uniform", u_ratio), pruner.prune("global", g_ratio)
    log(f"  baselines: uniform ratio {u_ratio:.3f}, global ratio {g_ratio:.3f}")
    proxy = _proxy_fn(cfg, loader, teacher, val, device)

    # 3. the Optuna study
    import optuna

    storage = _storage_url(cfg, run_dir)
    study_name = cfg.study_name or f"{ctx.run_name}-search"
    study = S.make_study(storage, study_name, cfg.objective, ctx.seed, cfg.budget_metric)
    n_groups = len(pruner.groups)
    step = cfg.ratio_step
    hi = round(math.floor(cfg.max_ratio / step + 1e-9) * step, 10)

    def snap(r: float) -> float:
        return min(hi, max(0.0, round(r / step) * step))

    before = len(study.trials)
    if before == 0:  # a fresh study starts from the lecture's two solutions
        for rs in ([u_ratio] * n_groups, pruner.group_ratios_of(global_)):
            study.enqueue_trial({f"g{i}": snap(r) for i, r in enumerate(rs)})

    def objective(trial):
        ratios = [trial.suggest_float(f"g{i}", 0.0, hi, step=step) for i in range(n_groups)]
        m = pruner.prune("per_layer", group_ratios=ratios)
        pred = predictor.predict(m)
        macs = S.count_macs(m, shape)
        trial.set_user_attr("predicted_ms", pred)
        trial.set_user_attr("predicted_rel", pred / dense_t)  # vs dense: comparable across re-runs
        trial.set_user_attr("macs", macs)
        trial.set_user_attr("widths", pruner.widths(m))  # ratios that round to the same channels are one model
        over = (pred / dense_t - cfg.budget) / cfg.budget if cfg.budget_metric == "latency" else (macs - budget) / budget
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
    search_s = time.perf_counter() - t0
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    log(f"  study {study_name}: {len(done)} trials ({len(study.trials) - before} added, {search_s:.1f} s)")

    # 4. top-k feasible candidates by proxy -> measured end to end, fine-tuned, chosen
    limit_key = cfg.budget if cfg.budget_metric == "latency" else budget
    feas = [t for t in done if S.feasible(t, cfg.budget_metric, limit_key)]
    feas.sort(key=lambda t: (-t.user_attrs.get("proxy", 0.0), t.user_attrs["predicted_rel"]))
    seen, top = set(), []
    for t in feas:
        key = tuple(t.user_attrs.get("widths", []))
        if key not in seen:
            seen.add(key)
            top.append((t, [round(t.params[f"g{i}"], 4) for i in range(n_groups)]))
        if len(top) >= cfg.top_k:
            break
    if not top:
        raise InputError(f"no trial met the budget ({budget_desc}); raise budget or max_ratio",
                         field="stages.search.budget")
    # plus the fastest trial whose proxy is at least the better baseline's: "as accurate, how much faster?"
    base_proxy = {"uniform": proxy(uniform), "global": proxy(global_)}
    bar = max(v["proxy"] for v in base_proxy.values())
    fast = sorted((t for t in feas if t.user_attrs.get("proxy", -1.0) >= bar),
                  key=lambda t: t.user_attrs["predicted_rel"])
    if fast and tuple(fast[0].user_attrs.get("widths", [])) not in seen:
        top.append((fast[0], [round(fast[0].params[f"g{i}"], 4) for i in range(n_groups)]))
    models = {"uniform": uniform, "global": global_}
    for j, (t, ratios) in enumerate(top):
        models[f"searched-{j + 1}"] = pruner.prune("per_layer", group_ratios=ratios)
    fastest_name = next((f"searched-{j + 1}" for j, (t, _) in enumerate(top) if fast and t.number == fast[0].number),
                        None)
    timing = S.measure_models({"dense": dense, **models}, shape, sdir / "onnx", cfg.backend, cfg.batch_size,
                              cfg.threads, cfg.measure.warmup, cfg.measure.iters, cfg.measure.rounds)
    # Re-anchor the predictor's one scalar on the models measured in *this* interleaved run (median of
    # measured / table sum over all of them, robust to one noisy model): the one-off dense measurement
    # at the start drifts with the machine's load. Relative differences stay the table's own.
    predictor.anchor({name: (m, timing[name]["p50"]) for name, m in {"dense": dense, **models}.items()})
    if cfg.budget_metric == "latency":
        budget = cfg.budget * timing["dense"]["p50"]
        budget_desc = (f"latency <= {cfg.budget:.2f} x dense ({budget:.3f} ms of {timing['dense']['p50']:.3f} ms "
                       f"measured with the candidates, {cfg.backend}, batch {cfg.batch_size})")
    rows = [{**S.model_row("dense", dense, shape, predictor), "measured_ms": timing["dense"]["p50"]}]
    for name, m in models.items():
        row = S.model_row(name, m, shape, predictor)
        row["measured_ms"] = timing[name]["p50"]
        row["error_pct"] = 100.0 * (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
        row.update(base_proxy[name] if name in base_proxy else proxy(m))
        if name == fastest_name:
            row["fastest_at_baseline_proxy"] = True
        if name.startswith("searched"):
            t, ratios = top[int(name.split("-")[1]) - 1]
            row["trial"] = t.number
            row["group_ratios"] = ratios
        elif name == "uniform":
            row["ratio"] = u_ratio
        else:
            row["ratio"] = g_ratio
        if cfg.finetune is not None and not data_free:
            train_loop(m, loader(cfg.finetune.batch_size, 202), cfg.finetune, device,
                       teacher=teacher if cfg.finetune.distill else None, distill=cfg.finetune.distill,
                       description=f"finetune {name}")
        if not data_free:
            row["val_accuracy"] = S.evaluate_on(m, val, device)["accuracy"]
            row["test_accuracy"] = ctx.evaluate(m)["accuracy"]
        rows.append(row)
    row_dense = rows[0]
    if not data_free:
        row_dense["val_accuracy"] = S.evaluate_on(dense, val, device)["accuracy"]
        row_dense["test_accuracy"] = ctx.evaluate(dense)["accuracy"]

    limit = budget * (1 + cfg.latency_tolerance)
    searched = [r for r in rows if r["name"].startswith("searched")]
    within = [r for r in searched if (r["measured_ms"] if cfg.budget_metric == "latency" else r["macs"]) <= limit]
    pool = within or searched
    score = "val_accuracy" if not data_free else "proxy"
    chosen = max(pool, key=lambda r: (r[score], -r["measured_ms"]))
    chosen_model = models[chosen["name"]]
    # the rule the run's gates read (compress.pipeline.gates): did the chosen model meet the budget as measured?
    measured_key = "measured_ms" if cfg.budget_metric == "latency" else "macs"
    dense_value = timing["dense"]["p50"] if cfg.budget_metric == "latency" else dense_macs
    within_budget = bool(chosen[measured_key] <= limit)
    measured_ratio = chosen[measured_key] / dense_value
    if not within_budget:
        log(f"[yellow]  the chosen model measured {measured_ratio:.3f} x dense, over the budget {cfg.budget} x dense "
            f"(+{cfg.latency_tolerance:.0%}): the run's gates fail[/]")
    block = {"kind": "prune", "importance": cfg.importance, "scope": "per_layer", "ratio": 0.0,
             "round_to": cfg.round_to, "max_ratio": cfg.max_ratio,
             "ratios": pruner.per_layer_block(chosen["group_ratios"])}
    if cfg.ignore is not None:
        block["ignore"] = cfg.ignore

    # 5. artifacts
    trial_pts = [{"number": t.number, "predicted_ms": t.user_attrs["predicted_rel"] * timing["dense"]["p50"],
                  "macs": t.user_attrs["macs"], "proxy": t.user_attrs.get("proxy", 0.0),
                  "feasible": S.feasible(t, cfg.budget_metric, limit_key)}
                 for t in done if "proxy" in t.user_attrs]
    plotted = [p for p in trial_pts if cfg.objective == "pareto" or p["feasible"]] or trial_pts
    base_pts = {r["name"]: r for r in rows if r["name"] in ("uniform", "global")}
    S.plot_pareto(plotted, base_pts, budget if cfg.budget_metric == "latency" else None, sdir / "pareto.png",
                  f"{ctx.run_name}: {cfg.objective} search ({len(done)} trials)")
    atomic_write_text(sdir / "prune_block.yaml", "# searched per-layer ratios: paste under stages:\n"
                      + yaml.safe_dump([block], sort_keys=False))
    md = S.comparison_markdown(rows, budget_desc)
    atomic_write_text(sdir / "comparison.md", f"# search: {ctx.run_name}\n\n{md}\nchosen: {chosen['name']}\n")
    errors = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    result = {
        "budget": budget, "budget_metric": cfg.budget_metric, "budget_desc": budget_desc, "dense_ms": dense_t,
        "objective": cfg.objective, "study": study_name, "storage": storage, "trials_total": len(done),
        "trials_added": len(study.trials) - before, "search_seconds": search_s,
        "table": {"file": latency_table(run_dir).name, "key": table.key, "entries": len(table.layers),
                  "measured_now": measured_now, "seconds": table_s},
        "predictor_scale": predictor.scale, "predictor_abs_error_pct_median": sorted(errors)[len(errors) // 2],
        "uniform_ratio": u_ratio, "global_ratio": g_ratio, "rows": rows, "chosen": chosen["name"],
        "within_budget": within_budget, "measured_ratio": measured_ratio, "budget_ratio": cfg.budget,
        "tolerance": cfg.latency_tolerance, "budget_limit_ratio": cfg.budget * (1 + cfg.latency_tolerance),
        "fastest_at_baseline_proxy": fastest_name, "prune_block": block, "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(sdir / "search.json", {**result, "trials": trial_pts})
    table.save()
    if cfg.apply:
        ctx.model = chosen_model
    return StageOutput(metrics={k: result[k] for k in ("trials_total", "trials_added", "chosen", "uniform_ratio",
                                                       "global_ratio", "predictor_abs_error_pct_median",
                                                       "within_budget", "measured_ratio")},
                       summary={"search": result})
