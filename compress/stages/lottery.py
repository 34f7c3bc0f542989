"""``lottery``: iterative magnitude pruning with rewinding (lottery tickets) and its controls.

Put it where the model still has its initialisation θ0 (usually the first stage): it trains every
level itself. Each finished level (and control) is written to ``<run>/lottery/<NN>/`` as it
completes, outside the stage directory the runner clears on resume, so ``--resume`` continues at the
next unfinished level. ``ctx.model`` becomes the trained ticket of the sparsest IMP level (masked).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional, Union

import torch
from pydantic import Field, model_validator

from ..train.config import OptimizerConfig, TrainLoopConfig
from .base import StageConfig
from ..config import Strict, require_exactly_one
from ..lottery import experiment as lottery
from ..io import atomic_write_json
from ..model_io import build_model
from ..errors import InputError
from ..paths import lottery_dir, lottery_plot
from .artifacts import MASKS
from .base import StageOutput, register_stage


class RewindConfig(Strict):
    """Late rewinding: weights and optimizer / LR-schedule state at this point of the dense run."""

    iterations: Optional[int] = Field(None, ge=0)
    epochs: Optional[float] = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self):
        return require_exactly_one(self, "iterations", "epochs")


class TrainBlock(Strict):
    """How every level is trained (the paper's LeNet settings by default: Adam 1.2e-3, batch 60)."""

    optimizer: OptimizerConfig = OptimizerConfig(name="adam", lr=1.2e-3, schedule="constant")
    iterations: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    batch_size: int = Field(60, ge=1)
    eval_every: int = Field(100, ge=1, description="iterations between validation/test evaluations")
    validation: int = Field(5000, ge=1, description="training examples held out for early stopping")

    @model_validator(mode="after")
    def _one(self):
        return require_exactly_one(self, "iterations", "epochs")


class Config(StageConfig):
    kind: Literal["lottery"] = "lottery"
    changes_structure: ClassVar[bool] = True
    rounds: int = Field(..., ge=1, description="pruning rounds (level r = pruned r times)")
    rate: float = Field(0.2, gt=0, lt=1, description="fraction of the *remaining* weights pruned per round")
    rates: dict[str, float] = Field(default_factory=dict, description="per-layer rate overrides, pattern -> rate")
    scope: Literal["layer", "global"] = "layer"
    ignore: list[str] = Field(default_factory=list, description="module/tensor patterns never pruned")
    mode: Literal["iterative", "one_shot"] = "iterative"
    rewind: Union[int, RewindConfig] = Field(0, description="0: rewind to init; an int or {iterations|epochs}: late")
    method: Literal["imp", "snip", "grasp", "synflow", "set", "rigl"] = Field(
        "imp", description="imp: magnitude after training; snip/grasp/synflow: masks from θ0; set/rigl: dynamic "
                           "sparse training from a random mask; all at the same densities")
    update_every: int = Field(100, ge=1, description="set/rigl: iterations between drop/grow updates")
    update_fraction: float = Field(0.3, gt=0, lt=1, description="set/rigl: initial drop/grow fraction (cosine decay)")
    init_batches: int = Field(10, ge=1, description="SNIP/GraSP: training batches scored at init")
    controls: list[Literal["random_reinit", "random_prune"]] = Field(default_factory=list)
    control_rounds: Optional[list[int]] = Field(None, description="levels the controls run at (default: all)")
    train: TrainBlock

    def provides(self) -> set[str]:
        return {MASKS}

    @model_validator(mode="after")
    def _checks(self):
        for pattern, r in self.rates.items():
            if not 0 < r < 1:
                raise ValueError(f"rates[{pattern!r}] must be in (0, 1), got {r}")
        if self.scope == "global" and self.rates:
            raise ValueError("rates (per-layer) cannot be combined with scope: global")
        if isinstance(self.rewind, int) and self.rewind < 0:
            raise ValueError("rewind must be >= 0")
        valid = set(range(1, self.rounds + 1)) if self.mode == "iterative" else {self.rounds}
        bad = sorted(set(self.control_rounds or []) - valid)
        if bad:
            raise ValueError(f"control_rounds {bad} are not pruned levels of this run ({sorted(valid)})")
        return self


def _steps(value: float, steps_per_epoch: int) -> int:
    return int(round(value * steps_per_epoch))


@register_stage("lottery", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Lottery tickets: IMP with rewinding, random-reinit / random-prune controls, per-level table."""
    t = cfg.train
    if t.validation >= len(ctx.data.train):
        raise InputError(f"validation ({t.validation}) must be smaller than the training split "
                         f"({len(ctx.data.train)})", field="train.validation")
    train_data, val = ctx.data.split_validation(t.validation, ctx.seed)
    batches = lottery.ShuffledBatches(train_data.train_dataset(), t.batch_size, ctx.seed, ctx.data.loader)
    spe = len(batches)
    total = t.iterations if t.iterations is not None else _steps(t.epochs, spe)
    rewind = cfg.rewind if isinstance(cfg.rewind, int) else (
        cfg.rewind.iterations if cfg.rewind.iterations is not None else _steps(cfg.rewind.epochs, spe))
    if rewind >= total:
        raise InputError(f"rewind point ({rewind} iterations) must be before the end of training ({total})",
                         field="rewind")
    loop = TrainLoopConfig(epochs=0, max_steps=total, optimizer=t.optimizer, batch_size=t.batch_size)
    plan = lottery.TrainPlan(loop, batches, total, t.eval_every, ctx.device)
    spec = lottery.LotterySpec(rounds=cfg.rounds, rate=cfg.rate, rates=dict(cfg.rates), scope=cfg.scope,
                               ignore=list(cfg.ignore), mode=cfg.mode, rewind_step=rewind,
                               controls=list(cfg.controls), control_rounds=cfg.control_rounds, seed=ctx.seed,
                               method=cfg.method, dst_every=cfg.update_every, dst_alpha=cfg.update_fraction)
    m = ctx.model_spec

    def fresh_init(seed: int):
        with torch.random.fork_rng():  # do not disturb the global RNG stream of the run
            torch.manual_seed(seed)
            return build_model(m.factory, m.kwargs)

    names = lottery.prunable_tensors(ctx.model, cfg.ignore)
    if not names:
        raise InputError("no prunable tensors left after `ignore`", field="ignore")
    work = lottery_dir(ctx.run_dir, ctx.index)
    result = lottery.run_lottery(ctx.model, spec, plan, lottery.Evalsets(val, ctx.data.test, ctx.data.loader),
                                 work, fresh_init, init_batches=ctx.calibration_batches(cfg.init_batches, t.batch_size)
                                 if cfg.method in ("snip", "grasp") else None, input_shape=ctx.input_shape)
    ctx.model = result.ticket.to(ctx.device)
    table = [{k: v for k, v in r.items() if k != "history"} for r in result.rows]
    plot_path = lottery_plot(ctx.run_dir, ctx.index)
    lottery.plot(result.rows, plot_path, title=f"{ctx.run_name}: {cfg.method} {cfg.mode}, rewind to {rewind}")
    atomic_write_json(work / "table.json", table)
    imp = [r for r in table if r["variant"] == cfg.method]
    return StageOutput(
        metrics={"levels": len(imp), "percent_remaining": imp[-1]["percent_remaining"],
                 "early_stop_test_accuracy": imp[-1]["early_stop_test_accuracy"],
                 "iterations_per_level": total, "rewind_iteration": rewind},
        summary={"lottery": {"rows": table, "plot": plot_path.name, "work_dir": str(work.relative_to(ctx.run_dir)),
                             "iterations": total, "rewind_iteration": rewind, "mode": cfg.mode,
                             "method": cfg.method}})
