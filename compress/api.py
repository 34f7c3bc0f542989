"""Python API: load a compressed model back from a run directory, without pickle."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .model_io import load_portable
from .paths import last_completed_stage
from .errors import InputError


def final_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of the last completed stage of a run."""
    last = last_completed_stage(run_dir)
    if last is None:
        raise InputError(f"no completed stage under {str(run_dir)!r}", field="run_dir")
    return last


def load(run_dir: str | Path, which: str = "final") -> nn.Module:
    """``which``: ``final`` (the compressed model), ``dense`` (the teacher), or a stage folder name."""
    run_dir = Path(run_dir)
    if which == "final":
        return load_portable(final_checkpoint(run_dir))
    if which == "dense":
        return load_portable(run_dir / "dense")
    return load_portable(run_dir / "stages" / which)
