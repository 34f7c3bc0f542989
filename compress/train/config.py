"""The training loop's settings, shared by ``train``, ``finetune`` and every block that embeds a
fine-tune (``prune.finetune_between``, ``search.finetune``, lottery levels)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..config import Strict


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    step_milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    step_gamma: float = Field(0.1, gt=0, le=1)


class DistillConfig(Strict):
    """Hinton-style distillation: loss = alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE."""

    alpha: float = Field(0.7, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)


class TrainLoopConfig(Strict):
    """Fields shared by ``train`` and ``finetune`` (and blocks that embed a fine-tune)."""

    epochs: int = Field(1, ge=0)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    warmup_epochs: float = Field(0.0, ge=0, description="linear LR warm-up, in epochs")
    batch_size: Optional[int] = Field(None, ge=1, description="overrides data.batch_size")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision of forward passes: bf16 (CPU or CUDA) or fp16 (CUDA only, with a "
                            "gradient scaler); the weights and optimizer stay fp32")
    channels_last: bool = Field(False, description="NHWC memory format for the model and 4-D inputs")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description="micro-batches summed into one optimizer step")
    compile: bool = Field(False, description="torch.compile the model; falls back to eager (with a warning) "
                                             "when compiling fails")
    ema: Optional[float] = Field(None, gt=0, lt=1, description="decay of an exponential moving average of the "
                                                                "weights; the average is what is evaluated and saved")


class StepCheckpoints(Strict):
    """Resume inside a training stage (``train``, ``finetune``): a checkpoint of the whole training
    state in the stage's folder, which ``--resume`` continues from and the completed stage deletes."""

    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="optimizer steps between step checkpoints (default: every epoch); one is also "
                                "written after at most 10 minutes of training")


class FinetuneBlock(TrainLoopConfig):
    """The fine-tune fields, reusable inside other blocks (``prune.finetune_between``, ``search.finetune``)
    and the ``finetune`` stage's own."""

    epochs: int = 5
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.01, momentum=0.9)
    distill: Optional[DistillConfig] = None
