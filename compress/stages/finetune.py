"""``finetune``: recover accuracy after a structural change, optionally distilling from the dense
teacher; masks from ``sparsify`` (or any other mask) stay fixed throughout."""
from __future__ import annotations

from typing import ClassVar, Literal

from ..train.config import FinetuneBlock, StepCheckpoints
from .base import StageConfig
from ..train.loop import StepCheckpointing
from ..train.loop import train as train_loop
from .artifacts import TEACHER
from .base import StageOutput, register_stage, step_checkpointing, training_metrics


class Config(StageConfig, FinetuneBlock, StepCheckpoints):
    kind: Literal["finetune"] = "finetune"
    changes_weights: ClassVar[bool] = True
    every_rank: ClassVar[bool] = True

    def needs(self) -> dict[str, str]:
        return {TEACHER: "distill"} if self.distill is not None else {}


def finetune(block: FinetuneBlock, ctx, description: str = "finetune",
             checkpointing: StepCheckpointing | None = None) -> dict:
    teacher = ctx.dense if block.distill is not None else None
    res = train_loop(ctx.model, ctx.train_loader(block.batch_size), block, ctx.device, teacher=teacher,
                     distill=block.distill, description=description, checkpointing=checkpointing,
                     objective=ctx.training_objective)
    return {**training_metrics(res), "distilled": teacher is not None}


@register_stage("finetune", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Fine-tune the current model (distilled from the dense teacher when ``distill`` is set)."""
    if cfg.distill is not None and ctx.dense is None:  # the recipe loader refuses such an order
        raise RuntimeError("bug: distillation without a dense teacher passed recipe validation")
    metrics = finetune(cfg, ctx, checkpointing=step_checkpointing(ctx, cfg))
    metrics.update(ctx.headline())
    return StageOutput(metrics=metrics)
