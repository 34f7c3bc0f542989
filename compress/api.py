"""Python API: load a compressed model back from a run directory, without pickle.

A run directory is data, not code: its ``arch.json`` names the factory that rebuilds the model,
and only model-zoo factories are called unless you allow more (``allow=["mypkg"]`` for factories
under your own package, ``trust_code=True`` for anything), so a run directory from someone else
cannot run code on your machine."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from torch import nn

from . import paths
from .errors import InputError
from .model_io import load_portable, read_json_file


def final_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of the last completed stage of a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("no such run directory", field=str(run_dir))
    stages = run_dir / "stages"
    done = sorted(p for p in stages.glob("*-*") if paths.is_done(p)) if stages.is_dir() else []
    if not done:
        raise InputError("no completed stage in this run directory", field=str(run_dir))
    return done[-1]


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
