"""Creating, locking, checking and reopening a run directory (its layout is named in :mod:`compress.paths`).

The rules, in one place:

- ``compress run`` into a missing or empty folder creates the run directory: the lock file first,
  then ``recipe.yaml``.
- A folder that holds nothing but a run's own files and no completed stage (a run that failed on
  bad input or was killed before its first stage finished) is run again in place, with or without
  ``--resume``.
- A run directory with completed stages is reopened only with ``--resume``; a plain run refuses
  and, when the recipe changed, names the first field that differs.
- ``--resume`` needs a run directory (``recipe.yaml`` beside the lock file, ``stages/`` or
  ``dense/``). It keeps every completed stage whose own config and every earlier stage's config
  are unchanged, and runs again from the first stage that changed, did not complete, or whose
  files are damaged, saying which and why (the first differing field path, e.g.
  ``stages[3].ratio``). The first stage it runs keeps its step checkpoint (``step.pt``: a training
  stage killed part-way) when that stage is unchanged, and continues from it. The top-level ``model``, ``data``, ``seed`` and ``device`` blocks feed
  every stage: a change there keeps nothing, so resume refuses it. ``gates`` and ``name`` change no
  stage: the completed run is judged again.
- A process that writes a run directory holds an exclusive ``flock`` on its lock file (released by
  the kernel when the process ends, even on SIGKILL); a second run into the same folder stops at
  once with an InputError naming the lock.
- Output-path problems are one line: a file where the folder should be, a parent that is a file or
  a name too long for the file system name ``--out`` (or ``name``), exit 2; a read-only file system,
  a permission or a full disk is an EnvironmentFailure naming the path, exit 4.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from .. import paths
from ..deploy.files import COMPRESSED_ONNX, PT2
from ..errors import InputError
from ..io import atomic_write_text, os_errors
from ..model_io import check_safetensors, factory_path, read_arch, read_json_file
from ..recipe import Recipe

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

# Top-level blocks every stage depends on: a change there leaves no stage to keep.
INVALIDATING = ("model", "data", "seed", "device")

_STAGE_FOLDER = re.compile(r"^(\d+)-")
_LAYOUT = {paths.RECIPE, paths.SUMMARY, paths.REPORT, paths.LOCK, "stages", "dense", "lottery",
           paths.search_db(".").name, paths.latency_table(".").name, paths.tensorrt_dir(".").name,
           COMPRESSED_ONNX, PT2}
_ONNX_ROOT = Path(COMPRESSED_ONNX).stem  # model.onnx, model.fp16.onnx, model.int8.onnx, model.onnx.data


def note(msg: str) -> None:
    """One line on stderr that --quiet does not hide: what resume kept, reran, and why."""
    sys.stderr.write(f"note: {msg}\n")
    sys.stderr.flush()


def _is_run_file(name: str) -> bool:
    """A top-level name a run writes (or its temporary files)."""
    if name in _LAYOUT or name.startswith(paths.search_db(".").name):
        return True
    if re.fullmatch(r"lottery-\d+\.png", name):
        return True
    if re.fullmatch(re.escape(_ONNX_ROOT) + r"(\.[a-z0-9]+)?\.onnx(\.data)?", name):
        return True
    return name.startswith(".") and (name.endswith((".tmp", ".pt2")) or name.startswith(".onnx-"))


def _entries(run_dir: Path) -> set[str]:
    with os_errors(run_dir, field="--out", action="read"):
        return {p.name for p in run_dir.iterdir()}


def _is_run_dir(entries: set[str]) -> bool:
    return paths.RECIPE in entries and (
        bool(entries & {paths.LOCK, "stages", "dense"}) or all(_is_run_file(n) for n in entries))


# ---------------------------------------------------------------------------------------------
# Recipe differences

_ABSENT = "<absent>"


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first field where two resolved recipes (or parts of them) differ: ``(path, old, new)``
    with a path like ``stages[3].ratio``; ``None`` when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            sub = f"{path}.{k}" if path else str(k)
            d = first_difference(old.get(k, _ABSENT), new.get(k, _ABSENT), sub)
            if d:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            d = first_difference(old[i] if i < len(old) else _ABSENT, new[i] if i < len(new) else _ABSENT,
                                 f"{path}[{i}]")
            if d:
                return d
        return None
    return None if old == new else (path, old, new)


def _short(v: Any) -> str:
    s = v if v is _ABSENT else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def describe_difference(d: tuple[str, Any, Any]) -> str:
    path, old, new = d
    return f"{path} ({_short(old)} -> {_short(new)})"


def saved_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The resolved recipe a run directory was started with (None when it has none)."""
    p = Path(run_dir) / paths.RECIPE
    if not p.is_file():
        return None
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise InputError("damaged: not a valid YAML recipe", field=str(p)) from None
    if not isinstance(data, dict):
        raise InputError("damaged: not a recipe (a YAML mapping)", field=str(p))
    return data


# ---------------------------------------------------------------------------------------------
# Output path checks, the lock

def _field_for(run_dir: Path, recipe: Recipe) -> str:
    """Which input chose this folder: ``name`` for the default runs/<name>, else ``--out``."""
    return "name" if run_dir == Path("runs") / recipe.name else "--out"


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long, a loop of links
        return False


def _check_target(run_dir: Path, recipe: Recipe) -> None:
    """The path itself can hold a run directory: no file in its place or above it, no name longer
    than the file system allows."""
    field = _field_for(run_dir, recipe)
    existing = next((p for p in [run_dir, *run_dir.parents] if _exists(p)), Path("."))
    try:
        name_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in run_dir.parts:
        n = len(os.fsencode(part))
        if n > name_max:
            which = "name" if part == recipe.name else "--out"
            raise InputError(f"the folder name {part[:32]!r}... is {n} bytes; the file system allows {name_max}",
                             field=which)
    if existing == run_dir and not run_dir.is_dir():
        raise InputError(f"{str(run_dir)!r} is a file, not a folder: choose another --out", field=field)
    if existing != run_dir and not existing.is_dir():
        raise InputError(f"{str(existing)!r} is a file, so the run directory {str(run_dir)!r} cannot be created "
                         "under it", field=field)


def _lock(run_dir: Path) -> int | None:
    """Take the run directory's lock (an exclusive flock on an open file: the kernel releases it
    when this process ends, however it ends). Returns the descriptor to close when done."""
    if fcntl is None:  # pragma: no cover
        return None
    lock = run_dir / paths.LOCK
    with os_errors(lock, field="--out", action="create"):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        by = f" (process {holder})" if holder.isdigit() else ""
        raise InputError(f"run directory {str(run_dir)!r} is in use by another compress run{by}: it holds the lock "
                         f"{str(lock)!r}; wait for it to finish or choose another --out", field="--out") from None
    except OSError:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # who holds it, for the message above; not essential
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ---------------------------------------------------------------------------------------------
# Completed stages, damage, what to throw away

def _stage_folders(run_dir: Path) -> dict[int, Path]:
    stages = run_dir / "stages"
    out: dict[int, Path] = {}
    if stages.is_dir():
        for p in stages.iterdir():
            m = _STAGE_FOLDER.match(p.name)
            if m and p.is_dir():
                out[int(m.group(1))] = p
    return out


class _Altered(InputError):
    """A kept checkpoint names another factory than the recipe: refuse, never rerun over it."""


def _check_factory(folder: Path, recipe: Recipe) -> None:
    """A kept checkpoint must name the recipe's own factory: anything else means the folder was
    altered, and resuming would import and call what it names."""
    arch = read_arch(folder, trust_code=True)  # parses and checks fields; the factory is compared, not called
    if factory_path(arch["factory"]) != factory_path(recipe.model.factory):
        raise _Altered(f"names factory {arch['factory']!r}, but the recipe's model.factory is "
                       f"{recipe.model.factory!r}: this run directory was altered; refusing to resume "
                       "(choose another --out)", field=str(folder / "arch.json"))


def _damage(folder: Path, recipe: Recipe, record: str, valid) -> str | None:
    """Why a completed checkpoint folder (its JSON ``record``, checked by ``valid``, its factory and
    its weights) cannot be reused; None: it can."""
    try:
        rec = read_json_file(folder / record)
        if not valid(rec):
            raise InputError(f"damaged: not a {record.removesuffix('.json')} record", field=str(folder / record))
        _check_factory(folder, recipe)
        check_safetensors(folder / "model.safetensors")
    except _Altered:
        raise
    except InputError as exc:
        return str(exc)
    return None


def _stage_damage(folder: Path, recipe: Recipe) -> str | None:
    return _damage(folder, recipe, paths.RESULT, lambda rec: isinstance(rec, dict) and isinstance(rec.get("stage"), dict)
                   and isinstance(rec.get("summary", {}), dict) and isinstance(rec.get("artifacts") or {}, dict))


def _dense_damage(run_dir: Path, recipe: Recipe) -> str | None:
    return _damage(paths.dense_dir(run_dir), recipe, paths.METRICS, lambda rec: isinstance(rec, dict))


def _teacher_of(run_dir: Path, index: int, kind: str) -> str | None:
    rec = read_json_file(paths.stage_dir(run_dir, index, kind) / paths.RESULT)
    return ((rec.get("artifacts") or {}).get("teacher")) if isinstance(rec, dict) else None


def _discard(run_dir: Path, old_kinds: list[str], new_kinds: list[str], start: int, changed: int) -> None:
    """Remove what stages ``start`` and later wrote, so nothing stale survives a re-run: their
    stage folders (except the step checkpoint of stage ``start`` when it is unchanged), the dense teacher unless a kept stage handed it on, the deployment files of a
    re-run export stage, lottery work that no longer fits, and the summary and report (written
    again at the end)."""
    for i, folder in _stage_folders(run_dir).items():
        if i == start and start < changed and folder.name == paths.stage_dir(run_dir, i, new_kinds[i]).name \
                and (folder / paths.STEP_CHECKPOINT).is_file():
            # the stage to run next, unchanged, was killed part-way: keep its step checkpoint only
            for p in folder.iterdir():
                if p.name != paths.STEP_CHECKPOINT:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif i >= start:
            shutil.rmtree(folder)
    kinds_after = set(old_kinds[start:]) | set(new_kinds[start:])
    teacher_kept = start > 0 and _teacher_of(run_dir, start - 1, new_kinds[start - 1]) is not None
    if not teacher_kept:
        shutil.rmtree(paths.dense_dir(run_dir), ignore_errors=True)
    # a lottery stage's units of work: kept for the stage that resumes (unchanged), dropped otherwise
    lottery = run_dir / "lottery"
    if lottery.is_dir():
        for p in lottery.iterdir():
            if p.name.isdigit() and (int(p.name) > start or int(p.name) >= changed):
                shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob("lottery-*.png"):
        m = re.fullmatch(r"lottery-(\d+)\.png", p.name)
        if m and int(m.group(1)) >= start:
            p.unlink()
    # a search study continues on a re-run of the search stage itself; a change before it starts over
    search_at = [i for i, k in enumerate(old_kinds) if k == "search"]
    if any(i > start for i in search_at):
        for p in run_dir.glob(paths.search_db(".").name + "*"):
            p.unlink()
        paths.latency_table(run_dir).unlink(missing_ok=True)
    if "export" in kinds_after:
        for p in run_dir.iterdir():
            if p.is_file() and (p.name == PT2 or re.fullmatch(
                    re.escape(_ONNX_ROOT) + r"(\.[a-z0-9]+)?\.onnx(\.data)?", p.name)):
                p.unlink()
    if "tensorrt" in kinds_after:
        shutil.rmtree(paths.tensorrt_dir(run_dir), ignore_errors=True)
    for name in (paths.SUMMARY, paths.REPORT):
        (run_dir / name).unlink(missing_ok=True)


def _write_recipe(run_dir: Path, recipe: Recipe) -> None:
    atomic_write_text(run_dir / paths.RECIPE, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def _plan_resume(run_dir: Path, recipe: Recipe, old: dict[str, Any]) -> int:
    """Decide where a resumed run starts (see the module docstring); clean up after that point and
    record ``recipe`` as the run's recipe. Returns the index of the first stage to run."""
    new = recipe.model_dump(mode="json")
    for key in INVALIDATING:
        d = first_difference(old.get(key, _ABSENT), new.get(key, _ABSENT), key)
        if d:
            raise InputError(f"the recipe differs from the one run directory {str(run_dir)!r} was started with at "
                             f"{describe_difference(d)}; every stage depends on {key!r}, so no completed stage "
                             "can be kept: choose another --out (or delete the folder)", field="--resume")
    old_st, new_st = list(old.get("stages") or []), new["stages"]
    old_kinds = [s.get("kind") if isinstance(s, dict) else None for s in old_st]
    new_kinds = [s.kind for s in recipe.stages]
    changed = next((i for i in range(min(len(old_st), len(new_st))) if old_st[i] != new_st[i]),
                   min(len(old_st), len(new_st)))
    done_before = 0  # completed stages under the saved recipe
    while done_before < len(old_kinds) and paths.is_done(paths.stage_dir(run_dir, done_before, old_kinds[done_before])):
        done_before += 1

    start = 0
    while start < min(changed, len(new_st)) and paths.is_done(paths.stage_dir(run_dir, start, new_kinds[start])):
        damage = _stage_damage(paths.stage_dir(run_dir, start, new_kinds[start]), recipe)
        if damage:
            note(f"{damage}: stage {start} ({new_kinds[start]}) and those after it will run again")
            break
        start += 1
    if changed < max(len(old_st), len(new_st)):
        d = first_difference(old_st[changed] if changed < len(old_st) else _ABSENT,
                             new_st[changed] if changed < len(new_st) else _ABSENT, f"stages[{changed}]")
        what = describe_difference(d) if d else f"stages[{changed}]"
        if done_before > changed and changed < len(new_st):
            kept = {0: "keeping no stage", 1: "keeping stage 0"}.get(changed, f"keeping stages 0-{changed - 1}")
            note(f"the recipe changed at {what}: {kept}; stage {changed} ({new_kinds[changed]}) and those after "
                 "it run again")
        elif done_before > changed:
            note(f"the recipe changed at {what}: stages {changed} and later were removed from it")
        else:
            note(f"the recipe changed at {what} (no completed stage is affected)")
    if start == len(new_st):
        d = first_difference(old.get("gates", _ABSENT), new.get("gates", _ABSENT), "gates")
        if d:
            note(f"the gates changed at {describe_difference(d)}: judging the completed stages again")

    # the dense teacher: recorded before (or by) the first stage that hands it on; check it if kept
    if start > 0 and _teacher_of(run_dir, start - 1, new_kinds[start - 1]) is not None:
        dense = paths.dense_dir(run_dir)
        damage = None if paths.is_done(dense) else f"{dense / paths.DONE}: missing (the teacher is incomplete)"
        damage = damage or _dense_damage(run_dir, recipe)
        if damage:
            t = next(i for i in range(start) if _teacher_of(run_dir, i, new_kinds[i]) is not None)
            note(f"{damage}: the dense teacher is recorded again; stage {t} ({new_kinds[t]}) and those after it "
                 "run again")
            start = t
    _discard(run_dir, old_kinds, new_kinds, start, changed)
    _write_recipe(run_dir, recipe)
    return start


def _open_locked(run_dir: Path, recipe: Recipe, resume: bool) -> int:
    entries = _entries(run_dir) - {paths.LOCK}
    if not entries:
        _write_recipe(run_dir, recipe)
        return 0
    old = saved_recipe(run_dir)
    if resume and old is None:
        raise InputError(f"{str(run_dir)!r} is not a run directory (it has no {paths.RECIPE}); "
                         "--resume continues a run compress started there", field="--resume")
    new = recipe.model_dump(mode="json")
    done = sum(paths.is_done(p) for p in _stage_folders(run_dir).values())
    if done and resume:
        return _plan_resume(run_dir, recipe, old)
    if done:
        msg = (f"run directory {str(run_dir)!r} is not empty: it holds a run with {done} completed stage"
               f"{'s' if done != 1 else ''} (use --resume to keep them, or another --out)")
        d = first_difference(old, new) if old is not None else None
        if d:
            msg += f"; its recipe differs at {describe_difference(d)}"
        raise InputError(msg, field="--out")
    # no stage completed: nothing to keep, so run again in place, with or without --resume
    if old is not None and first_difference(old, new) is None:
        return _plan_resume(run_dir, recipe, old)  # same recipe: keeps a killed lottery stage's work
    d = first_difference(old, new) if old is not None else None
    why = f" (the recipe changed at {describe_difference(d)})" if d else ""
    note(f"run directory {str(run_dir)!r} holds a run that stopped before any stage completed: "
         f"starting it again{why}")
    _discard(run_dir, [], [], 0, 0)
    for name in entries:  # whatever else the earlier attempt wrote; never a file that is not a run's
        p = run_dir / name
        if _is_run_file(name) and name != paths.LOCK and (p.exists() or p.is_symlink()):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    _write_recipe(run_dir, recipe)
    return 0


def _admissible(run_dir: Path, resume: bool) -> None:
    """Refuse a folder that is neither empty nor a run directory, before writing anything there."""
    if not run_dir.is_dir():
        return
    everything = _entries(run_dir)
    entries = everything - {paths.LOCK}
    if not entries:
        return
    if resume and not _is_run_dir(everything):
        raise InputError(f"{str(run_dir)!r} is not a run directory (no {paths.RECIPE} beside stages/ or the lock "
                         "file); --resume continues a run compress started there", field="--resume")
    if not resume and not _is_run_dir(everything) and not all(_is_run_file(n) for n in entries):
        raise InputError(f"run directory {str(run_dir)!r} is not empty and holds files that are not a compress run's "
                         "(choose another --out)", field="--out")


@contextlib.contextmanager
def open_run_dir(run_dir: str | Path, recipe: Recipe, resume: bool) -> Iterator[int]:
    """Create or reopen ``run_dir`` under its lock; yield the index of the first stage to run. The
    lock is held until the block ends (or the process does)."""
    run_dir = Path(run_dir)
    _check_target(run_dir, recipe)
    _admissible(run_dir, resume)
    with os_errors(run_dir, field=_field_for(run_dir, recipe), action="create"):
        run_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(run_dir)
    try:
        _admissible(run_dir, resume)  # again, under the lock
        yield _open_locked(run_dir, recipe, resume)
    finally:
        if fd is not None:
            os.close(fd)


def read_stage_result(run_dir: Path, index: int, kind: str) -> dict[str, Any]:
    """A completed stage's ``result.json``: ``stage`` (its summary entry), ``summary`` (its top-level
    summary blocks) and ``artifacts`` (what every stage so far handed on). An InputError names the
    file when it is missing or damaged."""
    path = paths.stage_dir(run_dir, index, kind) / paths.RESULT
    rec = read_json_file(path)
    if not isinstance(rec, dict) or not isinstance(rec.get("stage"), dict):
        raise InputError("damaged: not a stage result", field=str(path))
    return rec


def rerun_from(run_dir: Path, recipe: Recipe, index: int) -> None:
    """Make ``--resume`` run stage ``index`` (and everything after it) again, keeping the stages
    before it: drop their folders and record ``recipe`` as the run's recipe. For procedures that
    continue their own state on a re-run (a search's Optuna study)."""
    for i in range(index, len(recipe.stages)):
        shutil.rmtree(paths.stage_dir(run_dir, i, recipe.stages[i].kind), ignore_errors=True)
    _write_recipe(run_dir, recipe)


def same_prefix(run_dir: Path, recipe: Recipe, index: int) -> bool:
    """Whether the run directory was started with the same recipe up to (not including) stage
    ``index`` — every top-level block and the stages before it."""
    old = saved_recipe(run_dir)
    if old is None:
        return False
    new = recipe.model_dump(mode="json")
    strip = (lambda d: {k: v for k, v in d.items() if k != "stages"})
    return strip(old) == strip(new) and old.get("stages", [])[:index] == new["stages"][:index]
