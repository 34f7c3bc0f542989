"""Runs a recipe: stages in order, a checkpoint and completion marker per stage, resume, gates,
``summary.json`` and ``report.md``. Data flows one way: recipe -> stages -> artifacts.

Under torchrun (see :mod:`compress.distributed`) every process runs this. Rank 0 alone holds the
run directory's lock and writes files, logs and progress. Stages that declare ``every_rank``
(train, finetune, prune, sparsify) run on every rank: training in them is data-parallel, and what
they do besides training is deterministic given the same model, seed and data, so every rank ends
with the same model; rank 0's weights are broadcast afterwards all the same, which also checks
that the structures agree. Every other stage (export, benchmark, lottery, search, ...) runs on
rank 0 alone, while the others wait, and then hands its model to them: those stages write files,
time things or keep their own resumable state on disk, which N copies would race on or duplicate.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from .. import paths
from ..errors import DivergedError, GateError, InputError
from ..data.base import LABEL_SCAN_LIMIT, targets_of
from ..io import atomic_write_json, atomic_write_text, os_errors
from ..model_io import build_with_checkpoint, load_portable, save_portable
from ..preflight import preflight
from ..progress import log, set_quiet
from ..threads import advice as thread_advice, apply as apply_threads, choose_threads
from ..recipe import Recipe
from ..stages import STAGES, Artifacts, StageContext, StageOutput
from ..stages.artifacts import TEACHER
from ..stages.base import seed_everything
from ..tasks import build_objective
from .gates import chance_level, check_gates
from .report import write_report
from .run_dir import open_run_dir, read_stage_result


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA requested but not available on this machine", field="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_model(model, directory: Path, recipe: Recipe) -> None:
    save_portable(model, directory, recipe.model.factory, recipe.model.kwargs, recipe.model.input_shape)


def run_recipe(recipe: Recipe, run_dir: str | Path, resume: bool = False,
               threads: int | None = None) -> dict[str, Any] | None:
    """Run every stage; return the summary (None on ranks other than 0 under torchrun). Raises
    GateError (after writing everything) when a gate fails. The run directory is locked while this
    runs (see :mod:`.run_dir`); a full disk, a read-only file system or a permission is an
    EnvironmentFailure naming the path. ``threads`` (``--threads``) overrides ``recipe.threads``."""
    run_dir = Path(run_dir)
    launched_here = dist.launched() and not dist.active()
    device = dist.init_from_env(resolve_device(recipe.device))
    try:
        if not dist.is_main():
            set_quiet(True)  # one process reports
        requested, source = (threads, "--threads") if threads is not None else (recipe.threads, "recipe")
        # loader workers take a core each; the data block names them where the data layer has them
        workers = int(getattr(recipe.data, "num_workers", 0) or 0)
        choice = choose_threads(requested, source, dist.local_world_size(), workers)
        apply_threads(choice)
        seed_everything(recipe.seed)
        # the pre-run checks (model builds and runs the recipe's input, logits cover the labels, data
        # reads) before the run directory is touched; they leave the global random state as it was.
        # Rank 0 first: it may download the data, which the others then find in place
        with dist.main_first():
            data = preflight(recipe.model, recipe.data, recipe.seed, task=recipe.task).data
        if not dist.is_main():
            return _run(recipe, run_dir, device, dist.broadcast_object(None), data, choice.to_dict())
        with os_errors(run_dir, action="access"), open_run_dir(run_dir, recipe, resume) as start:
            dist.broadcast_object(start)
            note = thread_advice(choice)
            if note is not None:  # once the run has started: a refused input stays one line
                log(f"[yellow]threads: {note}[/]")
            return _run(recipe, run_dir, device, start, data, choice.to_dict())
    finally:
        if launched_here:
            dist.shutdown()


def _run(recipe: Recipe, run_dir: Path, device: torch.device, start: int, data,
         threads: dict) -> dict[str, Any] | None:
    main = dist.is_main()
    model = build_with_checkpoint(recipe.model.factory, recipe.model.kwargs, recipe.model.checkpoint)
    if recipe.model.checkpoint:
        _refuse_non_finite(model)
    dense = None
    artifacts = Artifacts()
    results: list[dict] = []
    summary: dict[str, Any] = {}
    if start > 0 and main:  # resume: restore model, teacher, artifacts and the results of completed stages
        own = [recipe.model.factory]  # the recipe names the factory: resuming it runs no one else's code
        model = load_portable(paths.stage_dir(run_dir, start - 1, recipe.stages[start - 1].kind), allow=own)
        if paths.is_done(paths.dense_dir(run_dir)):
            dense = load_portable(paths.dense_dir(run_dir), allow=own)
        for i in range(start):
            rec = read_stage_result(run_dir, i, recipe.stages[i].kind)
            results.append(rec["stage"])
            summary.update(rec.get("summary", {}))
            artifacts = Artifacts.from_dict(rec.get("artifacts"))
        log(f"resuming at stage {start} ({recipe.stages[start].kind if start < len(recipe.stages) else 'end'})")
    if start > 0:  # the other ranks get what rank 0 read (the run directory may be on its machine only)
        model, dense, artifacts = dist.broadcast_object((model, dense, artifacts) if main else None)
    model.to(device)
    if dense is not None:
        dense.to(device)
    ctx = StageContext(run_dir=run_dir, device=device, data=data, model=model, run_name=recipe.name,
                       run_seed=recipe.seed, model_spec=recipe.model, batch_size=recipe.data.batch_size,
                       dense=dense, artifacts=artifacts, objective=build_objective(recipe.task))
    if main and data.preprocess is not None:  # the input contract, beside the run's other records from the start
        atomic_write_json(run_dir / PREPROCESS_FILE, data.preprocess.contract())

    for i in range(start, len(recipe.stages)):
        cfg = recipe.stages[i]
        if ctx.dense is None and cfg.changes_structure and TEACHER not in cfg.provides():
            _record_teacher(ctx, ctx.model, recipe)
        sdir = paths.stage_dir(run_dir, i, cfg.kind)
        if main:
            sdir.mkdir(parents=True, exist_ok=True)
        ctx.index, ctx.stage_dir = i, sdir
        seed_everything(ctx.seed)
        log(f"[bold]stage {i}[/] {cfg.kind}")
        t0 = time.perf_counter()
        out = _run_stage(cfg, ctx, i)
        seconds = time.perf_counter() - t0
        if not main:
            continue
        if ctx.dense is not None and ctx.artifacts.teacher is None:  # a stage that trains the teacher itself
            _record_teacher(ctx, ctx.dense, recipe)
        entry = {"index": i, "kind": cfg.kind, "seconds": round(seconds, 3), **out.metrics}
        if out.skipped:
            entry["skipped"] = out.skipped
            log(f"  skipped: {out.skipped}")
        results.append(entry)
        summary.update(out.summary)
        _save_model(ctx.model, sdir, recipe)
        atomic_write_json(sdir / paths.RESULT, {"stage": entry, "summary": out.summary,
                                                "artifacts": ctx.artifacts.to_dict()})
        atomic_write_text(sdir / paths.DONE, "")  # written last: the stage counts as done only now
        (sdir / paths.STEP_CHECKPOINT).unlink(missing_ok=True)  # the stage's own checkpoint supersedes it
    if ctx.dense is None:
        _record_teacher(ctx, ctx.model, recipe)
    if not main:
        return None

    final = {**ctx.evaluate(), **ctx.stats()}
    dense_metrics = json.loads((paths.dense_dir(run_dir) / paths.METRICS).read_text())
    summary_out = _assemble(recipe, dense_metrics, final, results, summary, ctx)
    summary_out["threads"] = threads
    summary_out["processes"] = dist.world_size()
    for warning in summary_out["gates"]["warnings"]:  # on stderr even with --quiet: CI logs should show them
        print(f"warning: {warning}", file=sys.stderr)
    atomic_write_json(run_dir / paths.SUMMARY, summary_out)
    write_report(run_dir, summary_out)
    if not summary_out["gates"]["passed"]:
        raise GateError(summary_out["gates"]["failures"])
    return summary_out


def _run_stage(cfg, ctx: StageContext, i: int) -> StageOutput | None:
    """Run stage ``i`` where it runs (every rank, or rank 0 while the others wait; see the module
    docstring) and leave every rank with the same model, teacher and artifacts. None on a rank that
    did not run it."""
    spec = STAGES.get(cfg.kind)
    on_every_rank = type(cfg).every_rank or not dist.active()
    out = None
    dense_before = ctx.dense
    try:
        if on_every_rank:
            with dist.collective():
                out = spec.run(cfg, ctx)
        elif dist.is_main():
            out = spec.run(cfg, ctx)
    except DivergedError as exc:  # the training loop knows the step; the runner knows the stage
        raise DivergedError(f"stages[{i}] ({cfg.kind}): {str(exc).removeprefix(cfg.kind + ': ')}") from None
    if not dist.active():
        return out
    if on_every_rank:
        differed = dist.broadcast_state(ctx.model)
        if differed:  # the stage is not deterministic across processes here; rank 0's model goes on
            print(f"warning: stages[{i}] ({cfg.kind}): rank {dist.rank()}'s parameters differed from rank 0's in "
                  f"{len(differed)} tensor(s) (first: {differed[0]}); continuing with rank 0's", file=sys.stderr)
    else:
        changed = cfg.changes_model()
        model, new_dense, artifacts = dist.broadcast_object(
            (ctx.model if changed else None, ctx.dense if ctx.dense is not dense_before else None, ctx.artifacts)
            if dist.is_main() else None)
        if not dist.is_main():
            ctx.model = model.to(ctx.device) if changed else ctx.model
            ctx.dense = new_dense.to(ctx.device) if new_dense is not None else ctx.dense
            ctx.artifacts = artifacts
    return out


def _refuse_non_finite(model) -> None:
    """A checkpoint holding NaN or infinite weights cannot give a meaningful run: refuse it (exit 2)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(f"{bad} of {t.numel()} values of {name!r} are NaN or infinite", field="model.checkpoint")


def _record_teacher(ctx: StageContext, model, recipe: Recipe) -> None:
    """Snapshot ``model`` as the dense teacher (the distillation teacher and the accuracy reference)."""
    dense = model if model is ctx.dense else copy.deepcopy(model).eval()
    d = paths.dense_dir(ctx.run_dir)
    ctx.dense = dense
    ctx.artifacts.teacher = str(d.relative_to(ctx.run_dir))
    if not dist.is_main():  # the same teacher on every rank; rank 0 writes it
        return
    _save_model(dense, d, recipe)
    atomic_write_json(d / paths.METRICS, {**ctx.evaluate(dense), **ctx.stats(dense)})
    atomic_write_text(d / paths.DONE, "")


METRIC_KEYS = ("accuracy", "top5", "miou", "pixel_accuracy", "metric", "loss", "params", "nonzero_params", "macs")
PREPROCESS_FILE = "preprocess.json"


def _chance(ctx) -> float | None:
    """Accuracy of a constant prediction on the test labels (classification only; labels listed by the
    dataset, else read from at most a bounded sample of items)."""
    if ctx.objective.name != "classification":
        return None
    labels = targets_of(ctx.data.test)
    if labels is None:
        n = min(len(ctx.data.test), LABEL_SCAN_LIMIT)
        labels = torch.as_tensor([int(ctx.data.test[i][1]) for i in range(n)])
    return chance_level(labels, ctx.data.num_classes or int(labels.max()) + 1)


def _assemble(recipe: Recipe, dense: dict, final: dict, results: list[dict], extra: dict, ctx) -> dict:
    gates = check_gates(recipe, dense, final, extra, chance=_chance(ctx))
    out = {
        "name": recipe.name,
        "status": "passed" if gates["passed"] else "gates_failed",
        "seed": recipe.seed,
        "device": str(ctx.device),
        "torch": torch.__version__,
        "task": {"name": recipe.task.name, "primary_metric": recipe.task.primary},
        "data": ctx.data.describe(),
        "dense": {k: dense[k] for k in METRIC_KEYS if k in dense},
        "final": {k: final[k] for k in METRIC_KEYS if k in final},
        "stages": results,
        **extra,
        "gates": gates,
    }
    out.setdefault("export", {})
    out.setdefault("benchmark", [])
    return out
