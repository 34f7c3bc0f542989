"""``prune``: structured channel pruning on the dependency graph (Torch-Pruning DepGraph).

Allocation (``scope``): ``uniform`` removes ``ratio`` of every group; ``global`` ranks all groups'
per-group-normalised scores together (no group above ``max_ratio``); ``per_layer`` maps module-name
patterns to ratios (``ratios: {"layers.0.*": 0.3}``; unmatched groups use ``ratio``). ``target:
{macs: 0.5}`` / ``{params: 0.4}`` (fraction kept) replaces ``ratio`` by the smallest ratio that
reaches it, found by bisection on pruned copies; the achieved value is reported exactly.
``steps: k`` prunes in k equal steps, with ``finetune_between`` (a ``finetune`` block) in between.

Guards (``guards:``; each on by default, ``null``/``false`` turns it off, each binding reported in
the stage metrics ``guards.bound``): the first conv loses at most ``first_conv_max_ratio`` (0.5);
the classifier (the last Conv/Linear to run) loses no outputs; no group drops below
``min_channels`` (auto: max(8, original/16)); kept channel counts are multiples of ``round_to`` (8;
for grouped layers, per group as far as the group count allows). A pruned model whose output shape
moved is refused (ModelBreakError: module and shapes named; exit 2).

Models Torch-Pruning mis-handles: when the pruned model no longer runs, the step is redone group by
group; a group whose cut breaks forward first gets the integer attributes forward reads patched
(``hidden_dim``, ``head_dim``, split sizes; listed in ``patched_attributes``) and otherwise is
rolled back and listed in ``unpruned_groups`` with the reason. ``timing_s`` breaks the stage down
by phase (graph build, ranking, cuts, forward checks, MAC counting).

Attention: ``heads: {ratio: 0.25, head_dims: true}`` removes whole heads of q/k/v-projection
attention (Hugging Face style) and, with ``head_dims``, channels inside the surviving heads; head
counts and widths are patched so forward and ONNX export work. ``nn.MultiheadAttention`` loses the
same channels in every head; with ``heads`` it is first replaced by an equivalent module with
separate q/k/v projections (``attention_replaced`` in the metrics; portable checkpoints rebuild it),
so whole heads go too.

Re-parameterisable blocks (RepVGG/MobileOne-style branches): pruned as they are, the branches lose
the same channels (``reparameterizable`` lists them); ``reparameterize: true`` fuses them first with
the model's own ``reparameterize()``/``switch_to_deploy()`` (refused if the output moves; listed in
``reparameterized``; portable checkpoints fuse again on load) and prunes the fused convs.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Optional, Union

import torch
from pydantic import Field, field_validator, model_validator

from ..train.config import OptimizerConfig
from .base import StageConfig
from ..config import Strict, require_exactly_one
from ..metrics import call_model, count_macs, count_params, logits_of
from .artifacts import MASKS, TEACHER
from .base import StageOutput, register_stage
from .criteria_names import known_criterion
from .finetune import FinetuneBlock, finetune
from ..errors import EnvironmentFailure, GateError, InputError
from ..io import atomic_write_json
from ..progress import log
from .. import paths

# Torch-Pruning (and, through its op counter, timm -> torchvision -> torch._dynamo where timm is
# installed: seconds of imports) is imported by the functions that prune, not here: validating a
# recipe reads this module for its Config and must not pay for it.
if TYPE_CHECKING:
    from ..structured import pruner


class GuardsConfig(Strict):
    """On by default; ``null`` (or ``false`` for ``classifier``) turns one off."""

    first_conv_max_ratio: Optional[float] = Field(0.5, ge=0, le=1, description="the first conv loses at most this")
    classifier: bool = Field(True, description="the output layer loses no outputs")
    min_channels: Union[Literal["auto"], int, None] = Field(
        "auto", description="no group below this; auto = max(8, original/16)")
    round_to: Optional[int] = Field(8, ge=1, description="kept channel counts a multiple of this")

    @field_validator("min_channels")
    @classmethod
    def _min(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1, 'auto' or null")
        return v


class HeadsConfig(Strict):
    ratio: float = Field(0.25, ge=0, lt=1, description="fraction of attention heads removed (whole heads)")
    head_dims: bool = Field(True, description="also prune channels inside the surviving heads")


class TargetConfig(Strict):
    """Fraction KEPT (exactly one of the three). ``macs``/``params``: reached by bisection on the
    ratio. ``latency``: fraction of the dense model's measured latency, reached by the latency
    allocator (:mod:`compress.search.allocator`) and enforced end to end; the backend, batch size and
    threads default to the recipe's first benchmark stage (else onnxruntime, batch 1, 1 thread)."""

    macs: Optional[float] = Field(None, gt=0, lt=1)
    params: Optional[float] = Field(None, gt=0, lt=1)
    latency: Optional[float] = Field(None, gt=0, lt=1, description="fraction of dense latency (measured)")
    backend: Optional[str] = Field(None, description="latency: backend measured (default: the benchmark stage's first)")
    batch_size: Optional[int] = Field(None, ge=1, description="latency: batch size (default: the benchmark stage's first)")
    threads: Optional[int] = Field(None, ge=1, description="latency: intra-op threads (default: the benchmark stage's)")
    tolerance: float = Field(0.05, ge=0, lt=1, description="latency: measured may exceed the target by this fraction")
    refits: int = Field(3, ge=0, le=20, description="latency: re-measure and re-fit this often before failing (exit 3)")
    grid_points: int = Field(8, ge=0, description="latency: table widths per layer side (every round_to width up to this many)")
    cost: Literal["importance", "sensitivity"] = Field(
        "importance", description="latency: the allocator's accuracy cost: the importance criterion's scores, or "
                                  "the measured loss increase of each group narrowed alone (calibration_batches)")
    sensitivity_points: int = Field(3, ge=1, le=16, description="latency, cost sensitivity: widths probed per group")
    refit_groups: bool = Field(False, description="latency: re-fit the table per group first (each group narrowed "
                                                  "alone, measured end to end interleaved with dense)")

    @model_validator(mode="after")
    def _one(self):
        require_exactly_one(self, "macs", "params", "latency")
        if self.latency is None:
            extra = [f for f in ("backend", "batch_size", "threads") if getattr(self, f) is not None]
            extra += [f for f in ("cost", "sensitivity_points", "refit_groups") if f in self.model_fields_set]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to a latency target")
        elif self.backend is not None:
            from ..deploy.backends import BACKENDS
            try:
                BACKENDS.get(self.backend)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def key(self) -> str:
        return "macs" if self.macs is not None else "params" if self.params is not None else "latency"

    @property
    def value(self) -> float:
        return getattr(self, self.key)


class EarlyBirdConfig(FinetuneBlock):
    """``when: early_bird``: train from the current (untrained) weights only until the BN-|gamma|
    channel mask stops moving (You et al. 2020), then prune. ``epochs`` is the upper bound."""

    epochs: int = 30
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    window: int = Field(5, ge=2, description="masks compared (the newest against the previous window-1)")
    threshold: float = Field(0.1, gt=0, lt=1, description="max normalised Hamming distance for 'emerged'")


class Config(StageConfig):
    kind: Literal["prune"] = "prune"
    changes_structure: ClassVar[bool] = True
    every_rank: ClassVar[bool] = True
    when: Literal["trained", "early_bird"] = Field(
        "trained", description="trained: prune the model as it is; early_bird: train until the Early-Bird ticket emerges first")
    early_bird: EarlyBirdConfig = Field(default_factory=EarlyBirdConfig)
    importance: str = "l2"
    ratio: float = Field(0.5, description="fraction of channels removed per group (uniform) or overall (global)")
    scope: Literal["uniform", "global", "per_layer"] = "global"
    ratios: dict[str, float] = Field(default_factory=dict, description="per_layer: module-name pattern -> ratio")
    steps: int = Field(1, ge=1, description=">1 prunes iteratively in equal steps")
    round_to: Optional[int] = Field(8, ge=1, description="keep channel counts a multiple of this (= guards.round_to)")
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    heads: Optional[HeadsConfig] = Field(None, description="attention: remove whole heads")
    target: Optional[TargetConfig] = Field(None, description="reach a kept MACs/params fraction instead of a ratio")
    ignore: Optional[list[str]] = Field(None, description="module-name patterns never pruned; default: the classifier")
    max_ratio: float = Field(0.9, gt=0, le=1, description="no group loses more than this fraction (global scope)")
    calibration_batches: int = Field(4, ge=1, description="training batches for data-aware criteria (and a latency target's sensitivity cost)")
    finetune_between: Optional[FinetuneBlock] = None
    obs_update: bool = Field(False, description="importance obs: OBS-update the surviving weights")
    obs_dampening: float = Field(0.01, gt=0, description="importance obs: Fisher dampening, relative to its mean diagonal")
    reparameterize: bool = Field(False, description="fuse re-parameterisable blocks (the model's own "
                                 "reparameterize()/switch_to_deploy()) before pruning; otherwise their branches "
                                 "are pruned alike")
    allow_noop: bool = Field(False, description="accept a prune that removes nothing (otherwise the stage fails, exit 2)")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be >= 0 and < 1")
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if not 0 <= r < 1:
                raise ValueError(f"ratio for {k!r} must be >= 0 and < 1")
        return v

    @field_validator("importance")
    @classmethod
    def _importance(cls, v: str) -> str:
        return known_criterion(v)

    @model_validator(mode="after")
    def _early_bird_ranks_by_bn(self):
        # Early-Bird's ticket is a global BN-|gamma| ranking: prune by that unless told otherwise
        if self.when == "early_bird" and "importance" not in self.model_fields_set:
            self.__dict__["importance"] = "bn_scale"
        return self

    def provides(self) -> set[str]:
        # when: early_bird trains the dense net first, so the stage records the teacher itself
        return {TEACHER} if self.when == "early_bird" else set()

    def needs(self) -> dict[str, str]:
        ft = self.finetune_between
        return {TEACHER: "finetune_between.distill"} if ft is not None and ft.distill is not None else {}

    def conflicts(self) -> dict[str, str]:
        return {MASKS: "removing channels after weight masks were set drops the masks (their 2:4 layout "
                       "no longer lines up); prune before sparsify or lottery"}

    @model_validator(mode="after")
    def _obs_update_needs_obs(self):
        if self.obs_update and self.importance != "obs":
            raise ValueError("obs_update needs importance: obs")
        return self

    @model_validator(mode="after")
    def _per_layer_needs_ratios(self):
        if self.scope == "per_layer" and not self.ratios:
            raise ValueError("scope per_layer needs a 'ratios' map")
        if self.target is not None and self.scope == "per_layer":
            raise ValueError("target needs scope uniform or global (per_layer fixes every ratio)")
        if self.target is not None and self.target.latency is not None and (self.steps > 1 or self.heads):
            raise ValueError("a latency target prunes in one step and no attention heads (steps: 1, no heads)")
        return self

    def resolved_guards(self) -> pruner.Guards:
        from ..structured import pruner

        g = self.guards.model_dump()
        if "round_to" not in self.guards.model_fields_set and "round_to" in self.model_fields_set:
            g["round_to"] = self.round_to  # the older top-level spelling
        return pruner.Guards(**g)

    def pruner_kwargs(self) -> dict:
        """Everything GuardedPruner needs besides the model, example and importance."""
        return {"scope": self.scope, "per_layer": self.ratios if self.scope == "per_layer" else None,
                "ignore": self.ignore, "guards": self.resolved_guards(), "max_ratio": self.max_ratio,
                "heads_ratio": self.heads.ratio if self.heads else 0.0,
                "head_dims": self.heads.head_dims if self.heads else True}


def _output_signature(model, x):
    with torch.no_grad():
        return tuple(logits_of(call_model(model, x)).shape)


def _nothing_pruned(cfg: Config, ctx, model, example, kw: dict, ratio, skipped: list[dict] = ()) -> str:
    """Why a prune removed nothing; raises InputError (exit 2) naming the field unless
    ``allow_noop: true``, else logs and returns the reason."""
    from ..structured import pruner

    output = pruner.io_layers(model, example)[1]
    ignore = list(cfg.ignore or []) + ([output] if kw["guards"].classifier and output else [])
    groups = pruner.describe_groups(model, example, ignore)
    where = f"stages[{ctx.index}]"
    if not groups:
        field = f"{where}.ignore" if cfg.ignore else where
        why = ("the model has no prunable channel group (every Conv/Linear is ignored"
               f"{' by ignore: ' + str(cfg.ignore) if cfg.ignore else ''} or is the classifier)")
    else:
        field = f"{where}.{'target' if cfg.target is not None else 'ratios' if cfg.scope == 'per_layer' else 'ratio'}"
        why = (f"ratio {ratio} (scope {cfg.scope}) removed no channel from {len(groups)} prunable groups: Torch-Pruning "
               "leaves a group it would empty, and the guards and max_ratio may keep the rest; try a ratio such as 0.5")
    if skipped:
        first = skipped[0]
        why += (f"; {len(skipped)} group(s) were left unpruned because cutting them broke the model "
                f"(e.g. {first['group']}: {first['reason']})")
    if not cfg.allow_noop:
        raise InputError(f"nothing was pruned: {why}; set allow_noop: true on the stage to accept this", field=field)
    log(f"[yellow]  prune: nothing was pruned ({why}); allow_noop: true accepts it[/]")
    return why


@register_stage("prune", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Remove whole channels (and the coupled channels of every dependent layer), within the guards."""
    from ..structured import pruner, reparam
    from ..structured.criteria import IMPORTANCES, calibrate as calibrate_criterion
    from ..structured.early_bird import EarlyBird, train_until_early_bird

    early_bird = None
    if cfg.when == "early_bird":
        eb = cfg.early_bird
        detector = EarlyBird(ratio=cfg.ratio, window=eb.window, threshold=eb.threshold)
        train_until_early_bird(ctx.model, ctx.train_loader(eb.batch_size), eb, detector, ctx.device)
        early_bird = {"found_at_epoch": detector.found_at, "max_epochs": eb.epochs,
                      "distances": [None if d != d else round(d, 4) for d in detector.distances]}
        ctx.dense = copy.deepcopy(ctx.model).eval()  # the early-bird-trained net is the teacher and reference
    model = ctx.model.to(ctx.device).eval()
    example = ctx.example_inputs(1)
    before = ctx.stats()
    rep_blocks = reparam.find_reparameterizable(model)
    if cfg.reparameterize and not rep_blocks:
        raise InputError("no module of the model has reparameterize() or switch_to_deploy()", field="reparameterize")
    fused = reparam.reparameterize(model, example) if cfg.reparameterize else []
    out_shape = _output_signature(model, example)
    criterion = IMPORTANCES.get(cfg.importance, field="importance")
    calib = ctx.calibration_batches(cfg.calibration_batches) if (criterion.needs or criterion.calibrate) else []
    kw = cfg.pruner_kwargs()

    def build_importance():
        return criterion.build(obs_update=cfg.obs_update, obs_dampening=cfg.obs_dampening)

    def calibrate(m, imp):
        calibrate_criterion(criterion, imp, m, calib, ctx.device, loss=ctx.objective.loss)  # the task's loss

    # guards and max_ratio stay relative to the unpruned model across steps and pruner instances
    kw["reference"] = pruner.channel_counts(model, example)
    if cfg.target is not None and cfg.target.latency is not None:
        return _prune_to_latency(cfg, ctx, model, example, before, out_shape, build_importance, calibrate, kw)
    measure, goal, searches, ratios = None, None, [], []
    if cfg.target is not None:
        key, goal = cfg.target.key, cfg.target.value
        base = before[key]
        measure = ((lambda m: count_macs(m, ctx.input_shape, ctx.device, example) / base) if key == "macs"
                   else (lambda m: count_params(m) / base))

    gp, step_metrics, guard_hits, patched, skipped, timing, replaced = None, [], [], [], [], {}, []
    for step in range(cfg.steps):
        if cfg.target is not None:
            # iterative with a target: each step reaches its share of the budget on the current
            # (possibly fine-tuned) model, so the last step lands on the goal itself
            step_goal = 1 - (1 - goal) * (step + 1) / cfg.steps
            r, trials = pruner.ratio_for_target(model, example, build_importance, measure, step_goal,
                                                 hi=min(0.95, cfg.max_ratio), prepare_step=calibrate, **kw)
            searches.append({"step": step + 1, "goal": step_goal, "ratio_found": r, "trials": trials})
            gp = pruner.GuardedPruner(model, example, build_importance(), ratio=r, steps=1, **kw)
            ratios.append(r)
        elif gp is None:
            gp = pruner.GuardedPruner(model, example, build_importance(), ratio=cfg.ratio, steps=cfg.steps, **kw)
            ratios.append(cfg.ratio)
        if step == 0:
            guard_hits += gp.bound  # the classifier guard, recorded once
        calibrate(model, gp.pruner.importance)
        guard_hits += gp.step()
        patched += gp.patched
        replaced += [c for c in gp.converted if c not in replaced]
        skipped += [dict(s, step=step + 1) for s in gp.skipped if dict(s, step=step + 1) not in skipped]
        gp.patched, gp.skipped = [], []
        for phase, seconds in gp.timing.items():
            timing[phase] = timing.get(phase, 0.0) + seconds
        gp.timing = {}
        model.zero_grad(set_to_none=True)
        pruner.check_model_runs(model, example, out_shape, gp.output_name, when=f"after pruning step {step + 1}")
        if cfg.finetune_between is not None and step < cfg.steps - 1:
            step_metrics.append(finetune(cfg.finetune_between, ctx, description=f"finetune {step + 1}"))
    if gp is not None:  # layers left at full width that no step reported (Torch-Pruning drops them silently)
        skipped += [dict(s, step=cfg.steps) for s in gp.whole_layers()
                    if not any(s["group"] == k["group"] for k in skipped)]
    ratio = ratios[0] if len(ratios) == 1 else ratios
    ctx.model = model
    t0 = time.perf_counter()
    after = ctx.stats()
    timing["count_macs"] = time.perf_counter() - t0
    noop = None
    if after["params"] == before["params"] and after["macs"] == before["macs"]:
        noop = _nothing_pruned(cfg, ctx, model, example, kw, ratio, skipped)
    primary, acc = next(iter(ctx.headline().items()))
    metrics = {
        "importance": cfg.importance, "scope": cfg.scope, "ratio": ratio, "steps": cfg.steps,
        "params_before": before["params"], "params_after": after["params"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "macs_kept": after["macs"] / max(1, before["macs"]), "params_kept": after["params"] / max(1, before["params"]),
        f"{primary}_after_prune": acc,
        "guards": {**vars(kw["guards"]), "bound": guard_hits},
        # attributes forward reads that were rewritten to follow a pruned width, and groups left
        # unpruned because cutting them broke the model or Torch-Pruning could not map them
        "patched_attributes": patched,
        "unpruned_groups": skipped,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
    }
    if fused:  # blocks fused before pruning (reparameterize: true)
        metrics["reparameterized"] = fused
    elif rep_blocks:  # their training-time branches were pruned alike, left unfused
        metrics["reparameterizable"] = [n for n, _ in rep_blocks]
    if replaced:  # nn.MultiheadAttention swapped for the split-projection form (whole-head pruning)
        metrics["attention_replaced"] = replaced
    if gp.sites:
        metrics["attention"] = [{"module": s.name, "heads": s.heads, "head_dim": s.head_dim} for s in gp.sites]
    search = None
    if cfg.target is not None:
        key = cfg.target.key
        search = {"target": {key: goal}, "achieved": {key: metrics[f"{key}_kept"]}, "steps": searches}
        metrics["target"] = search
    if step_metrics:
        metrics["finetune_between"] = step_metrics
    if early_bird is not None:
        metrics["early_bird"] = early_bird
    if noop is not None:
        metrics["noop"] = noop
    summary = {"prune": {"target": search["target"], "achieved": search["achieved"], "ratio": ratio}} if search else {}
    return StageOutput(metrics=metrics, summary=summary)


def _prune_to_latency(cfg: Config, ctx, model, example, before: dict, out_shape, build_importance, calibrate,
                      kw: dict) -> StageOutput:
    """``target: {latency: f}``: the latency allocator on the target backend, measured end to end
    interleaved with the dense model; a model that still misses after the re-fits fails the stage (exit 3)."""
    from ..deploy.timing import BackendUnavailable
    from ..search.latency_target import LatencySetup, fit_latency
    from ..structured import pruner

    t = cfg.target
    setup = LatencySetup(backend=t.backend or "onnxruntime", batch_size=t.batch_size or 1, threads=t.threads or 1,
                         tolerance=t.tolerance, refits=t.refits, grid_points=t.grid_points, refit_groups=t.refit_groups)
    try:
        fit = fit_latency(model, ctx.input_shape, example, build_importance, calibrate, budget=t.latency,
                          setup=setup, guards=kw["guards"], ignore=cfg.ignore, max_ratio=cfg.max_ratio,
                          table_path=paths.latency_table(ctx.run_dir), work_dir=Path(ctx.stage_dir) / "latency",
                          reference=kw["reference"], log=log, cost=t.cost,
                          batches=ctx.calibration_batches(cfg.calibration_batches) if t.cost == "sensitivity" else (),
                          loss=ctx.objective.loss, sensitivity_points=t.sensitivity_points)
    except BackendUnavailable as exc:  # e.g. backend tensorrt on a machine without a GPU
        raise EnvironmentFailure(f"stages[{ctx.index}].target.backend: {setup.backend} cannot measure here: {exc}") from None
    block = fit.summary()
    atomic_write_json(Path(ctx.stage_dir) / "latency_fit.json", block)
    if not fit.result.within:
        raise GateError([f"stages[{ctx.index}] (prune): target latency {t.latency:g} x dense on {setup.backend} "
                         f"(batch {setup.batch_size}, {setup.threads} thread(s)) not met: {fit.result.shortfall()}; "
                         f"details in {Path(ctx.stage_dir) / 'latency_fit.json'}"])
    pruned = fit.result.model
    pruner.check_model_runs(pruned, example, out_shape, None, when="after the latency allocation")
    ctx.model = pruned
    after = ctx.stats()
    achieved = {"latency": block["measured_ratio"]}
    primary, score = next(iter(ctx.headline().items()))  # the task's metric: accuracy, mIoU, ...
    metrics = {
        "importance": cfg.importance, "scope": "latency_allocator", "ratio": 0.0, "steps": 1,
        "params_before": before["params"], "params_after": after["params"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "macs_kept": after["macs"] / max(1, before["macs"]), "params_kept": after["params"] / max(1, before["params"]),
        f"{primary}_after_prune": score,
        "guards": {**vars(kw["guards"]), "bound": [{"guard": "floor", "group": g, "detail": "narrowest width the "
                                                   "guards allow"} for g in block["at_guard_floor"]]},
        "target": {"target": {"latency": t.latency}, "achieved": achieved, "latency": block},
    }
    summary = {"prune": {"target": {"latency": t.latency}, "achieved": achieved, "ratio": 0.0,
                         "widths": block["widths"], "per_layer": block["per_layer"]}}
    return StageOutput(metrics=metrics, summary=summary)
