"""Instability analysis (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket
Hypothesis") of a recipe's lottery stage: train two copies from the same θ_k with different data
orders and measure the error barrier on the straight line between them.

It reproduces what the lottery stage sees: the run's θ0 (the model built right after seeding with
the run's seed, as the runner does), the stage's seed (:func:`compress.paths.stage_seed`) for the
validation split and the data order, and the stage's training length and optimizer. Given the
stage's run directory, it starts from that run's θ0 and one level's masks
(:func:`compress.paths.lottery_dir`), so the barrier is the one of the sparse network at that level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

from . import connectivity
from .experiment import ShuffledBatches, init_path, load_tensors, masks_path
from ..config import ModelConfig
from ..data import DataConfig, build_data
from ..errors import InputError
from ..io import atomic_write_json
from ..model_io import build_model
from ..paths import lottery_dir, seed_everything, stage_seed
from ..sparsity.masks import set_masks
from ..train.config import OptimizerConfig, TrainLoopConfig

RESULT = "instability.json"
PLOT = "instability.png"


class TrainSettings(Protocol):
    """What is read of the lottery stage's ``train`` block (``stages.lottery.TrainBlock``)."""

    optimizer: OptimizerConfig
    iterations: Optional[int]
    epochs: Optional[float]
    batch_size: int
    validation: int


def instability(model: ModelConfig, data: DataConfig, train: TrainSettings, run_seed: int, index: int,
                out: str | Path, *, rewind: int = 0, run_dir: str | Path | None = None, level: int = 0,
                points: int = 30) -> dict[str, Any]:
    """Train two copies of the lottery stage's network from θ_k (``rewind`` = k, 0: θ0) to the end of
    its training with different data orders; write ``instability.json`` and ``instability.png``
    under ``out`` and return the JSON's content: ``rewind_iteration``, ``iterations``, ``level``
    (None without ``run_dir``), ``barrier`` (percentage points) and ``curve``.

    ``index`` is the lottery stage's position in the recipe, ``run_seed`` the recipe's seed.
    With ``run_dir``, the network is that run's θ0 with the masks of level ``level``."""
    seed = stage_seed(run_seed, index)  # the lottery stage's seed: same validation split and data order
    seed_everything(run_seed)
    bundle = build_data(data, tuple(model.input_shape) if model.input_shape else None, run_seed)
    train_data, _ = bundle.split_validation(train.validation, seed)
    net = build_model(model.factory, model.kwargs)
    if run_dir is not None:
        work = lottery_dir(run_dir, index)
        mask_file = masks_path(work, level)
        if not mask_file.is_file():
            raise InputError(f"{str(mask_file)!r} does not exist", field="--level")
        net.load_state_dict(load_tensors(init_path(work)))
        set_masks(net, load_tensors(mask_file))
    batches = ShuffledBatches(train_data.train_dataset(), train.batch_size, seed, bundle.loader)
    total = train.iterations if train.iterations is not None else int(round(train.epochs * len(batches)))
    if rewind >= total:
        raise InputError(f"must be below the training length ({total})", field="--rewind")
    loop = TrainLoopConfig(epochs=0, max_steps=total, optimizer=train.optimizer)
    start = connectivity.state_at(net, rewind, loop, batches) if rewind else None
    a, b = connectivity.train_two_copies(net, start, loop, train_data.train_dataset(),
                                         train.batch_size, seeds=(seed + 1, seed + 2))
    curve = connectivity.interpolation_curve(a, b, bundle.test, points)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"rewind_iteration": rewind, "iterations": total, "level": level if run_dir else None,
           "barrier": connectivity.barrier(curve), "curve": curve}
    atomic_write_json(out / RESULT, res)
    connectivity.plot_curves({f"k={rewind}": curve}, out / PLOT, title="instability")
    return res
