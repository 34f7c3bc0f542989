"""Python API: load a compressed model back from a run directory, without pickle.

A run directory is data, not code: its ``arch.json`` names the factory that rebuilds the model,
and only model-zoo factories are called unless you allow more (``allow=["mypkg"]`` for factories
under your own package, ``trust_code=True`` for anything), so a run directory from someone else
cannot run code on your machine.

Also: run a recipe's search stage so that re-running continues its study (:func:`search`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import nn

from . import paths
from .errors import InputError
from .model_io import load_portable, read_json_file
from .pipeline.run_dir import rerun_from, same_prefix
from .pipeline.runner import run_recipe
from .recipe import Recipe, apply_overrides, load_recipe, validate_data


def final_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of the last completed stage of a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("no such run directory", field=str(run_dir))
    last = paths.last_completed_stage(run_dir)
    if last is None:
        raise InputError("no completed stage in this run directory", field=str(run_dir))
    return last


def _check_stage(folder: Path) -> None:
    """A completed stage folder holds its result.json (written before DONE); a missing or damaged
    one means the folder was altered or copied in part."""
    if not paths.is_done(folder):
        raise InputError("this stage did not complete (no DONE marker)", field=str(folder))
    rec = read_json_file(folder / paths.RESULT)
    if not isinstance(rec, dict) or not isinstance(rec.get("stage"), dict):
        raise InputError("damaged: no 'stage' entry", field=str(folder / paths.RESULT))


def load(run_dir: str | Path, which: str = "final", *, allow: Iterable[str] = (),
         trust_code: bool = False) -> nn.Module:
    """``which``: ``final`` (the compressed model), ``dense`` (the teacher), or a stage folder name
    (``01-prune``).

    Only model-zoo factories are rebuilt unless ``allow`` names the factory's module (a prefix:
    ``allow=["mypkg"]`` allows ``mypkg.models:net``) or ``trust_code=True``. Damaged or missing
    files raise :class:`~compress.errors.InputError` naming the file."""
    run_dir = Path(run_dir)
    allow = tuple(allow)
    if which == "final":
        folder = final_checkpoint(run_dir)
        _check_stage(folder)
    elif which == "dense":
        folder = paths.dense_dir(run_dir)
        if not paths.is_done(folder):
            raise InputError("no dense teacher in this run directory (dense/DONE missing)", field=str(run_dir))
    else:
        if Path(which).name != which or which in (".", ".."):
            raise InputError("must be 'final', 'dense' or a stage folder name such as '01-prune'", field="which")
        folder = run_dir / "stages" / which
        if not folder.is_dir():
            raise InputError(f"no stage folder {which!r} in this run directory", field=str(run_dir))
        _check_stage(folder)
    return load_portable(folder, allow=allow, trust_code=trust_code)


def _resolve(recipe: Recipe | str | Path, overrides: Sequence[str]) -> Recipe:
    if isinstance(recipe, Recipe):
        return validate_data(apply_overrides(recipe.model_dump(mode="json"), list(overrides))) if overrides else recipe
    return load_recipe(recipe, list(overrides))


def search(recipe: Recipe | str | Path, run_dir: str | Path | None = None, *, trials: int | None = None,
           workers: int | None = None, storage: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run a recipe up to and including its (first) ``search`` stage; later stages are left out.

    ``recipe``: a recipe file or a validated :class:`~compress.recipe.Recipe`; ``overrides`` are
    ``PATH=VALUE`` items as for ``--set``. ``trials``, ``workers`` and ``storage`` override the
    search stage's fields of the same name. ``run_dir`` defaults to ``runs/<name>``.

    Re-running into the same run directory continues the same Optuna study: the stages before the
    search are reused (they must be the same as in the run directory's recipe, else InputError),
    the search stage's folder is dropped and the search runs again, adding ``trials`` trials.

    Returns ``name``, ``run_dir``, ``stage_dir`` (the search stage's folder, holding
    ``prune_block.yaml``), ``resumed`` (whether an earlier run was continued), ``search`` (the
    ``search`` block of ``summary.json``) and ``summary`` (all of it). Raises GateError, after
    writing everything, when a recipe gate fails.
    """
    r = _resolve(recipe, overrides)
    idx = next((i for i, s in enumerate(r.stages) if s.kind == "search"), None)
    if idx is None:
        raise InputError("the recipe has no stage of kind 'search'", field="stages")
    settings = [f"stages.{idx}.{k}={v}" for k, v in (("trials", trials), ("workers", workers),
                                                      ("storage", storage)) if v is not None]
    if settings:
        r = _resolve(recipe, [*overrides, *settings])
    r = r.model_copy(update={"stages": r.stages[: idx + 1]})
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / r.name
    resume = (run_dir / paths.RECIPE).exists()
    if resume:  # same stages before the search: reuse them, run the search again (the study continues)
        if not same_prefix(run_dir, r, idx):
            raise InputError(f"run directory {str(run_dir)!r} was started with a different recipe", field="--out")
        rerun_from(run_dir, r, idx)
    summary = run_recipe(r, run_dir, resume=resume)
    return {"name": r.name, "run_dir": run_dir, "stage_dir": paths.stage_dir(run_dir, idx, "search"),
            "resumed": resume, "search": summary["search"], "summary": summary}
