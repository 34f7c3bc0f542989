"""``prune``: structured channel pruning on the dependency graph (Torch-Pruning DepGraph)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, field_validator, model_validator

from ..config import StageConfig
from ..core import criteria, pruning
from ..core.metrics import logits_of
from ..errors import ModelBreakError
from .base import StageOutput, register_stage
from .finetune import FinetuneBlock, finetune


class Config(StageConfig):
    kind: Literal["prune"] = "prune"
    importance: str = "l2"
    ratio: float = Field(0.5, description="fraction of channels removed per group (uniform) or overall (global)")
    scope: Literal["uniform", "global", "per_layer"] = "global"
    ratios: dict[str, float] = Field(default_factory=dict, description="per_layer: module-name pattern -> ratio")
    steps: int = Field(1, ge=1, description=">1 prunes iteratively in equal steps")
    round_to: Optional[int] = Field(8, ge=1, description="keep channel counts a multiple of this")
    ignore: Optional[list[str]] = Field(None, description="module-name patterns never pruned; default: the classifier")
    max_ratio: float = Field(0.9, gt=0, le=1, description="no group loses more than this fraction (global scope)")
    calibration_batches: int = Field(4, ge=1, description="training batches for data-aware criteria")
    finetune_between: Optional[FinetuneBlock] = None
    obs_update: bool = Field(False, description="importance obs: OBS-update the surviving weights")
    obs_dampening: float = Field(0.01, gt=0, description="importance obs: Fisher dampening, relative to its mean diagonal")

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
        if v not in pruning.IMPORTANCES:
            raise ValueError(f"unknown criterion {v!r} (known: {', '.join(pruning.IMPORTANCES.names())})")
        return v

    @model_validator(mode="after")
    def _obs_update_needs_obs(self):
        if self.obs_update and self.importance != "obs":
            raise ValueError("obs_update needs importance: obs")
        return self

    @model_validator(mode="after")
    def _per_layer_needs_ratios(self):
        if self.scope == "per_layer" and not self.ratios:
            raise ValueError("scope per_layer needs a 'ratios' map")
        return self


def _output_signature(model, x):
    with torch.no_grad():
        return tuple(logits_of(model(x)).shape)


@register_stage("prune", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Remove whole channels (and the coupled channels of every dependent layer)."""
    model = ctx.model.to(ctx.device).eval()
    example = ctx.example_inputs(1)
    before = ctx.stats()
    out_shape = _output_signature(model, example)
    criterion = pruning.IMPORTANCES.get(cfg.importance, field="importance")
    importance = criterion.build(obs_update=cfg.obs_update, obs_dampening=cfg.obs_dampening)
    pruner = pruning.build_pruner(model, example, importance, ratio=cfg.ratio, scope=cfg.scope,
                                  steps=cfg.steps, round_to=cfg.round_to, ignore=cfg.ignore,
                                  per_layer=cfg.ratios, max_ratio=cfg.max_ratio)
    calib = ctx.calibration_batches(cfg.calibration_batches) if (criterion.needs or criterion.calibrate) else []
    step_metrics = []
    for step in range(cfg.steps):
        pruning.calibrate(criterion, importance, model, calib, ctx.device)
        criteria.prune_step(pruner, importance)  # plain pruner.step() unless the criterion has a hook
        model.zero_grad(set_to_none=True)
        try:
            got = _output_signature(model.eval(), example)
        except RuntimeError as exc:
            raise ModelBreakError(f"model no longer runs after pruning step {step + 1}: {exc}") from None
        if got != out_shape:
            raise ModelBreakError(f"pruning changed the output shape {out_shape} -> {got}")
        if cfg.finetune_between is not None and step < cfg.steps - 1:
            step_metrics.append(finetune(cfg.finetune_between, ctx, description=f"finetune {step + 1}"))
    ctx.model = model
    after = ctx.stats()
    acc = ctx.evaluate()["accuracy"]
    return StageOutput(metrics={
        "importance": cfg.importance, "scope": cfg.scope, "ratio": cfg.ratio, "steps": cfg.steps,
        "params_before": before["params"], "params_after": after["params"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "macs_kept": after["macs"] / max(1, before["macs"]), "params_kept": after["params"] / max(1, before["params"]),
        "accuracy_after_prune": acc, **({"finetune_between": step_metrics} if step_metrics else {}),
    })
