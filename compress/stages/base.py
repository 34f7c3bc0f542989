"""What a stage is (:class:`StageConfig`), what it sees (:class:`StageContext`) and what it returns
(:class:`StageOutput`).

A stage is one module with a pydantic ``Config`` (its recipe block, ``kind: <name>``) and one
entry point ``run(cfg, ctx) -> StageOutput``, registered in ``STAGES``. The config declares what the
stage needs from earlier stages and provides to later ones (artifact names from
:mod:`compress.stages.artifacts`) and whether it changes the model's structure; the recipe loader
checks a recipe's stage order against those declarations, so an impossible order is an input error
at ``validate`` time, not a failure after hours of training. Stages edit ``ctx.model`` in place or
replace it; the runner checkpoints the model after every stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from torch.utils.data import Subset, default_collate

from ..config import ModelConfig, Strict
from ..data import DataBundle, make_loader
from ..metrics import evaluate, model_stats, to_device
from .. import paths
from ..tasks import Objective, build_objective
from ..paths import seed_everything as seed_everything, stage_seed  # re-exported for the runner
from ..registry import Registry
from .artifacts import Artifacts


class StageConfig(Strict):
    """Fields every stage has. ``optional: true`` turns 'this backend is unavailable here' into a
    skipped stage instead of a failed run.

    Declarations (override in a stage's ``Config``):
    ``changes_structure`` — the stage removes channels or sets weight masks; the runner records the
    dense teacher before the first such stage. ``changes_weights`` — the stage trains or edits
    weights without changing the structure (train, finetune). A stage that does either
    (``changes_model()``) cannot follow the files written from the model (``artifacts.SNAPSHOTS``:
    ONNX, PT2, TensorRT engines), which would then describe a stale model; the recipe loader
    refuses that order. ``every_rank`` — under torchrun the stage runs on every process (its
    training is data-parallel, everything else it does deterministic); otherwise rank 0 runs it
    alone and hands its model to the others (see :mod:`compress.pipeline.runner`). ``needs()`` — artifact name -> the config field that asks for it.
    ``provides()`` — artifact names this stage writes. ``conflicts()`` — artifact name -> why this
    stage cannot run once it exists."""

    kind: str
    optional: bool = False

    changes_structure: ClassVar[bool] = False
    changes_weights: ClassVar[bool] = False
    every_rank: ClassVar[bool] = False  # under torchrun: runs on every rank (training in it is data-parallel)

    def changes_model(self) -> bool:
        return self.changes_structure or self.changes_weights

    def needs(self) -> dict[str, str]:
        return {}

    def provides(self) -> set[str]:
        return set()

    def conflicts(self) -> dict[str, str]:
        return {}

    def unavailable_here(self) -> tuple[str, str] | None:
        """(field, reason) when this machine cannot run the stage as configured (a backend, extra or
        device missing), checked when the recipe is loaded, before any stage trains. A stage marked
        ``optional: true`` is skipped at run time instead, so it is never unavailable here."""
        return None


@dataclass
class StageOutput:
    """``metrics`` go to the stage's entry in ``summary.stages``; ``summary`` keys are merged into
    the top level of ``summary.json`` (e.g. ``export``, ``benchmark``)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class StageSpec:
    config: type
    run: Callable[[Any, "StageContext"], StageOutput]
    doc: str = ""


STAGES: Registry[StageSpec] = Registry("stage kind")


def register_stage(kind: str, config: type, doc: str = ""):
    def deco(fn):
        STAGES.add(kind, StageSpec(config, fn, doc or (fn.__doc__ or "").strip().split("\n")[0]))
        return fn

    return deco


def step_checkpointing(ctx: "StageContext", cfg):
    """Step checkpoints of a training stage, in its folder (``cfg.checkpoint_every``)."""
    from ..train.loop import StepCheckpointing

    return StepCheckpointing(paths.stage_dir(ctx.run_dir, ctx.index, cfg.kind) / paths.STEP_CHECKPOINT,
                             every=cfg.checkpoint_every)


def training_metrics(res) -> dict[str, Any]:
    """A training stage's entry in ``summary.stages``: steps, epochs, last train loss, throughput,
    and ``resumed_at_step`` when it continued from a step checkpoint."""
    out: dict[str, Any] = {"steps": res.steps, "epochs": res.epochs_run,
                           "train_loss": res.history[-1]["train_loss"] if res.history else None,
                           "samples_per_s": res.samples_per_s}
    if res.resumed_at_step is not None:
        out["resumed_at_step"] = res.resumed_at_step
    if res.compile is not None:
        out["compile"] = res.compile
    return out


@dataclass
class StageContext:
    run_dir: Path
    device: torch.device
    data: DataBundle
    model: nn.Module
    run_name: str
    run_seed: int
    model_spec: ModelConfig                 # the recipe's model block (factory, kwargs, input shape)
    batch_size: int                         # the recipe's data.batch_size
    dense: nn.Module | None = None          # the teacher: the model before the first structural change
    artifacts: Artifacts = field(default_factory=Artifacts)
    index: int = 0
    stage_dir: Path | None = None
    objective: Objective = field(default_factory=lambda: build_objective(None))  # the recipe's task

    @property
    def seed(self) -> int:
        """Per-stage seed: resuming at stage k reproduces what an uninterrupted run does there."""
        return stage_seed(self.run_seed, self.index)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The recipe's ``model.input_shape``, else one sample's shape when inputs are one tensor;
        None for dict / tuple inputs (use :meth:`example_inputs`)."""
        if self.model_spec.input_shape is not None:
            return tuple(self.model_spec.input_shape)
        return self.data.input_shape

    def path(self, relative: str | None) -> Path | None:
        """An artifact path (relative to the run directory) as a path."""
        return None if relative is None else self.run_dir / relative

    @property
    def training_objective(self) -> Objective | None:
        """What the training loop gets as ``objective``: None for classification, so the loop builds
        the classification task with the stage's ``label_smoothing``."""
        return None if self.objective.name == "classification" else self.objective

    def train_loader(self, batch_size: int | None = None, seed_offset: int = 0, shuffle: bool = True):
        """Training batches (augmented when shuffled: augmentation is for training order only)."""
        bs = batch_size or self.batch_size
        return make_loader(self.data.train_dataset(augmented=shuffle), bs, shuffle=shuffle,
                           seed=self.seed + seed_offset, drop_last=shuffle, options=self.data.loader)

    def eval_loader(self, dataset=None, batch_size: int = 256):
        """Batches of ``dataset`` (default: the test split) in order."""
        return make_loader(self.data.test if dataset is None else dataset, batch_size, shuffle=False,
                           options=self.data.loader)

    def calibration_batches(self, n: int, batch_size: int | None = None) -> list[tuple]:
        """``n`` fixed batches from the training split, not augmented (data-aware criteria, SparseGPT,
        int8 calibration, SNIP/GraSP)."""
        bs = batch_size or self.batch_size
        g = torch.Generator().manual_seed(self.seed + 7)
        idx = torch.randperm(len(self.data.train), generator=g)[: n * bs].tolist()
        return list(make_loader(Subset(self.data.train, idx), bs, shuffle=False, options=self.data.loader))

    def evaluate(self, model: nn.Module | None = None, dataset=None) -> dict[str, float]:
        """The task's metrics (classification: accuracy, top5, loss; segmentation: miou, ...)."""
        m = model if model is not None else self.model
        return evaluate(m, self.eval_loader(dataset), device=self.device, objective=self.objective)

    def headline(self, metrics: dict[str, float] | None = None) -> dict[str, float]:
        """``{primary metric name: value}`` for a stage's metrics table."""
        metrics = self.evaluate() if metrics is None else metrics
        return {self.objective.primary: metrics[self.objective.primary]}

    def stats(self, model: nn.Module | None = None) -> dict[str, int]:
        m = model if model is not None else self.model
        return model_stats(m, self.input_shape, self.device, example=self.example_inputs(1))

    def example_inputs(self, batch: int = 1):
        """The inputs of the first ``batch`` test items (a real batch: tensor, tuple or dict), on the device."""
        n = min(batch, len(self.data.test))
        inputs = default_collate([self.data.test[i] for i in range(n)])[0]
        return to_device(inputs, self.device)
