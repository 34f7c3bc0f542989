"""Every file and folder of a run directory, and the seeds (per stage, global RNGs), named in one place.

Whoever reads or writes a run directory (the pipeline, a stage, an analysis, the Python API)
asks this module for the path instead of spelling it: a run directory's layout is a contract with
CI jobs and other tools, so it changes here or nowhere.

    <run>/recipe.yaml                 the resolved recipe the run was started with
    <run>/summary.json, report.md     written at the end
    <run>/dense/                      the dense teacher (portable checkpoint + metrics.json + DONE)
    <run>/stages/NN-<kind>/           per stage: portable checkpoint, result.json, then DONE
    <run>/stages/NN-<kind>/step.pt    a training stage's last step checkpoint (removed once DONE)
    <run>/lottery/NN/                 a lottery stage's units of work (outlive a failed stage)
    <run>/search.db, latency_table.json   a search stage's Optuna study and latency table
    <run>/tensorrt/                   TensorRT engines and their build record
    <run>/model.onnx (+ .fp16/.int8)  the deployment files (names: compress.deploy.files)
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

RECIPE = "recipe.yaml"
SUMMARY = "summary.json"
REPORT = "report.md"
DONE = "DONE"                  # written last: a folder counts as complete only once it exists
RESULT = "result.json"         # a stage's metrics, summary block and artifacts
METRICS = "metrics.json"       # the dense teacher's metrics
LOCK = ".lock"
STEP_CHECKPOINT = "step.pt"    # the training state inside a stage (compress.train.loop.StepCheckpointing)


def stage_dir(run_dir: str | Path, index: int, kind: str) -> Path:
    return Path(run_dir) / "stages" / f"{index:02d}-{kind}"


def dense_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "dense"


def is_done(folder: str | Path) -> bool:
    return (Path(folder) / DONE).exists()


def last_completed_stage(run_dir: str | Path) -> Path | None:
    """The folder of the last stage that finished (``stages/NN-kind/`` with ``DONE``), or None."""
    stages = Path(run_dir) / "stages"
    done = sorted(p for p in stages.glob("*-*") if is_done(p)) if stages.is_dir() else []
    return done[-1] if done else None


def stage_seed(run_seed: int, index: int) -> int:
    """Per-stage seed: resuming at stage k reproduces what an uninterrupted run does there, and an
    analysis of stage k (instability) sees the same data order and validation split."""
    return run_seed * 1000 + index


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators: the runner does this with the run's
    seed before building data and model (so θ0 follows from the recipe) and with the stage seed
    before each stage; an analysis that rebuilds a run's model does the same."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lottery_dir(run_dir: str | Path, index: int) -> Path:
    return Path(run_dir) / "lottery" / f"{index:02d}"


def lottery_plot(run_dir: str | Path, index: int) -> Path:
    return Path(run_dir) / f"lottery-{index:02d}.png"


def search_db(run_dir: str | Path) -> Path:
    return Path(run_dir) / "search.db"


def latency_table(run_dir: str | Path) -> Path:
    return Path(run_dir) / "latency_table.json"


def tensorrt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tensorrt"
