"""``train``: the dense baseline. Skipped when ``model.checkpoint`` supplies trained weights."""
from __future__ import annotations

from typing import ClassVar, Literal

from ..train.config import OptimizerConfig, TrainLoopConfig
from .base import StageConfig
from ..train.loop import train as train_loop
from .base import StageOutput, register_stage


class Config(StageConfig, TrainLoopConfig):
    kind: Literal["train"] = "train"
    changes_weights: ClassVar[bool] = True
    epochs: int = 20
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)


@register_stage("train", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Train the dense model from its initialisation."""
    if ctx.model_spec.checkpoint:
        return StageOutput(skipped="model.checkpoint given")
    res = train_loop(ctx.model, ctx.train_loader(cfg.batch_size), cfg, ctx.device, description="train",
                     objective=ctx.training_objective)
    return StageOutput(metrics={"steps": res.steps, "epochs": res.epochs_run,
                                "train_loss": res.history[-1]["train_loss"] if res.history else None,
                                **ctx.headline()})
