"""``train``: the dense baseline. Skipped when ``model.checkpoint`` supplies trained weights."""
from __future__ import annotations

from typing import ClassVar, Literal

from ..train.config import OptimizerConfig, StepCheckpoints, TrainLoopConfig
from .base import StageConfig
from ..train.loop import train as train_loop
from .base import StageOutput, register_stage, step_checkpointing, training_metrics


class Config(StageConfig, TrainLoopConfig, StepCheckpoints):
    kind: Literal["train"] = "train"
    changes_weights: ClassVar[bool] = True
    every_rank: ClassVar[bool] = True
    epochs: int = 20
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)


@register_stage("train", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Train the dense model from its initialisation."""
    if ctx.model_spec.checkpoint:
        return StageOutput(skipped="model.checkpoint given")
    res = train_loop(ctx.model, ctx.train_loader(cfg.batch_size), cfg, ctx.device, description="train",
                     checkpointing=step_checkpointing(ctx, cfg), objective=ctx.training_objective)
    return StageOutput(metrics={**training_metrics(res), **ctx.headline()})
