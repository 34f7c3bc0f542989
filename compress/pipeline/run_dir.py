"""Creating, checking and reopening a run directory (its layout is named in :mod:`compress.paths`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from .. import paths
from ..errors import InputError
from ..io import atomic_write_text
from ..recipe import Recipe


def completed_stages(run_dir: Path, recipe: Recipe) -> int:
    """How many leading stages finished (their DONE marker exists)."""
    n = 0
    for i, st in enumerate(recipe.stages):
        if paths.is_done(paths.stage_dir(run_dir, i, st.kind)):
            n = i + 1
        else:
            break
    return n


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> int:
    """Create (or, with resume, reopen) the run directory; return the index of the first stage to run."""
    resolved = recipe.model_dump(mode="json")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not resume:
            raise InputError(f"run directory {str(run_dir)!r} is not empty (use --resume or another --out)",
                             field="--out")
        saved = run_dir / paths.RECIPE
        if saved.exists() and yaml.safe_load(saved.read_text()) != resolved:
            raise InputError(f"recipe differs from the one this run directory was started with ({saved})",
                             field="--resume")
        start = completed_stages(run_dir, recipe)
        # anything after the last completed stage is partial: remove it so nothing half-written survives
        for i in range(start, len(recipe.stages)):
            d = paths.stage_dir(run_dir, i, recipe.stages[i].kind)
            if d.exists():
                shutil.rmtree(d)
        return start
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / paths.RECIPE, yaml.safe_dump(resolved, sort_keys=False))
    return 0


def read_stage_result(run_dir: Path, index: int, kind: str) -> dict[str, Any]:
    """A completed stage's ``result.json``: ``stage`` (its summary entry), ``summary`` (its top-level
    summary blocks) and ``artifacts`` (what every stage so far handed on)."""
    return json.loads((paths.stage_dir(run_dir, index, kind) / paths.RESULT).read_text())


def rerun_from(run_dir: Path, recipe: Recipe, index: int) -> None:
    """Make ``--resume`` run stage ``index`` (and everything after it) again, keeping the stages
    before it: drop their folders and record ``recipe`` as the run's recipe. For procedures that
    continue their own state on a re-run (a search's Optuna study)."""
    for i in range(index, len(recipe.stages)):
        shutil.rmtree(paths.stage_dir(run_dir, i, recipe.stages[i].kind), ignore_errors=True)
    atomic_write_text(run_dir / paths.RECIPE, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def same_prefix(run_dir: Path, recipe: Recipe, index: int) -> bool:
    """Whether the run directory was started with the same recipe up to (not including) stage
    ``index`` — every top-level block and the stages before it."""
    saved = run_dir / paths.RECIPE
    if not saved.exists():
        return False
    old = yaml.safe_load(saved.read_text())
    new = recipe.model_dump(mode="json")
    strip = (lambda d: {k: v for k, v in d.items() if k != "stages"})
    return strip(old) == strip(new) and old.get("stages", [])[:index] == new["stages"][:index]
