"""Runs a recipe: stages in order, a checkpoint and completion marker per stage, resume, gates,
``summary.json`` and ``report.md``. Data flows one way: recipe -> stages -> artifacts."""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..io import atomic_write_json, atomic_write_text
from ..model_io import build_model, load_portable, load_weights, save_portable
from ..progress import log
from ..data import build_data
from ..errors import GateError, InputError
from ..recipe import Recipe
from ..stages import STAGES, StageContext, StageOutput
from ..stages.base import seed_everything

DONE = "DONE"
STRUCTURE_CHANGING = {"prune", "sparsify", "lottery", "search"}  # the teacher is the model before the first of these


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA requested but not available on this machine", field="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stage_dir(run_dir: Path, index: int, kind: str) -> Path:
    return run_dir / "stages" / f"{index:02d}-{kind}"


def _completed(run_dir: Path, recipe: Recipe) -> int:
    """How many leading stages finished (their marker exists)."""
    n = 0
    for i, st in enumerate(recipe.stages):
        if (stage_dir(run_dir, i, st.kind) / DONE).exists():
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
        saved = run_dir / "recipe.yaml"
        if saved.exists() and yaml.safe_load(saved.read_text()) != resolved:
            raise InputError(f"recipe differs from the one this run directory was started with ({saved})",
                             field="--resume")
        start = _completed(run_dir, recipe)
        # anything after the last completed stage is partial: remove it so nothing half-written survives
        for i in range(start, len(recipe.stages)):
            d = stage_dir(run_dir, i, recipe.stages[i].kind)
            if d.exists():
                shutil.rmtree(d)
        return start
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return 0


def _save_model(model, directory: Path, recipe: Recipe) -> None:
    save_portable(model, directory, recipe.model.factory, recipe.model.kwargs, recipe.model.input_shape)


def run_recipe(recipe: Recipe, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run every stage; return the summary. Raises GateError (after writing everything) when a
    gate fails."""
    run_dir = Path(run_dir)
    device = resolve_device(recipe.device)
    seed_everything(recipe.seed)
    start = prepare_run_dir(run_dir, recipe, resume)
    data = build_data(recipe.data, tuple(recipe.model.input_shape), recipe.seed)

    model = build_model(recipe.model.factory, recipe.model.kwargs)
    if recipe.model.checkpoint:
        load_weights(model, recipe.model.checkpoint)
    dense = None
    results: list[dict] = []
    summary: dict[str, Any] = {}
    if start > 0:  # resume: restore model, teacher and the results of completed stages
        last = stage_dir(run_dir, start - 1, recipe.stages[start - 1].kind)
        model = load_portable(last)
        if (run_dir / "dense" / DONE).exists():
            dense = load_portable(run_dir / "dense")
        for i in range(start):
            rec = json.loads((stage_dir(run_dir, i, recipe.stages[i].kind) / "result.json").read_text())
            results.append(rec["stage"])
            summary.update(rec.get("summary", {}))
        log(f"resuming at stage {start} ({recipe.stages[start].kind if start < len(recipe.stages) else 'end'})")
    model.to(device)
    ctx = StageContext(recipe=recipe, run_dir=run_dir, device=device, data=data, model=model, dense=dense,
                       summary=summary)
    ctx.record_dense = lambda: _record_dense(ctx, run_dir, recipe)

    for i in range(start, len(recipe.stages)):
        cfg = recipe.stages[i]
        if ctx.dense is None and cfg.kind in STRUCTURE_CHANGING and not getattr(cfg, "trains_dense", False):
            _record_dense(ctx, run_dir, recipe)
        sdir = stage_dir(run_dir, i, cfg.kind)
        sdir.mkdir(parents=True, exist_ok=True)
        ctx.index, ctx.stage_dir = i, sdir
        seed_everything(ctx.seed)
        log(f"[bold]stage {i}[/] {cfg.kind}")
        t0 = time.perf_counter()
        out: StageOutput = STAGES.get(cfg.kind).run(cfg, ctx)
        seconds = time.perf_counter() - t0
        entry = {"index": i, "kind": cfg.kind, "seconds": round(seconds, 3), **out.metrics}
        if out.skipped:
            entry["skipped"] = out.skipped
            log(f"  skipped: {out.skipped}")
        results.append(entry)
        summary.update(out.summary)
        _save_model(ctx.model, sdir, recipe)
        atomic_write_json(sdir / "result.json", {"stage": entry, "summary": out.summary})
        atomic_write_text(sdir / DONE, "")  # written last: the stage counts as done only now
    if ctx.dense is None:
        _record_dense(ctx, run_dir, recipe)

    final = {**ctx.evaluate(), **ctx.stats()}
    dense_metrics = json.loads((run_dir / "dense" / "metrics.json").read_text())
    summary_out = _assemble(recipe, dense_metrics, final, results, summary, ctx)
    atomic_write_json(run_dir / "summary.json", summary_out)
    from .report import write_report

    write_report(run_dir, summary_out)
    if not summary_out["gates"]["passed"]:
        raise GateError(summary_out["gates"]["failures"])
    return summary_out


def _record_dense(ctx: StageContext, run_dir: Path, recipe: Recipe):
    """Snapshot the dense model (the distillation teacher and the accuracy reference)."""
    dense = copy.deepcopy(ctx.model).eval()
    d = run_dir / "dense"
    _save_model(dense, d, recipe)
    atomic_write_json(d / "metrics.json", {**ctx.evaluate(dense), **ctx.stats(dense)})
    atomic_write_text(d / DONE, "")
    ctx.dense = dense
    return dense


def check_gates(recipe: Recipe, dense: dict, final: dict, summary: dict) -> dict:
    g = recipe.gates
    failures: list[str] = []
    checked: dict[str, Any] = {}
    if g.max_accuracy_drop is not None:
        drop = dense["accuracy"] - final["accuracy"]
        checked["accuracy_drop"] = drop
        if drop > g.max_accuracy_drop:
            failures.append(f"accuracy drop {drop:.2f} pp > max_accuracy_drop {g.max_accuracy_drop}")
    if g.min_speedup is not None:
        rows = [r for r in summary.get("benchmark", []) if "speedup" in r]
        if not rows:
            failures.append("min_speedup set but no benchmark stage measured a speedup")
        else:
            sp = rows[0]["speedup"]
            checked["speedup"] = sp
            if sp < g.min_speedup:
                failures.append(f"speedup {sp:.3f} < min_speedup {g.min_speedup} "
                                f"({rows[0]['backend']}, batch {rows[0]['batch_size']})")
    if g.max_parity_error is not None:
        err = summary.get("export", {}).get("parity_max_abs_error")
        if err is None:
            failures.append("max_parity_error set but no export stage measured parity")
        else:
            checked["parity_max_abs_error"] = err
            if err > g.max_parity_error:
                failures.append(f"parity error {err:.3g} > max_parity_error {g.max_parity_error}")
    if g.max_int8_accuracy_drop is not None:
        acc8 = summary.get("export", {}).get("int8_accuracy")
        if acc8 is None:
            failures.append("max_int8_accuracy_drop set but no export stage wrote an int8 model (onnx.int8)")
        else:
            drop = final["accuracy"] - acc8
            checked["int8_accuracy_drop"] = drop
            if drop > g.max_int8_accuracy_drop:
                failures.append(f"int8 accuracy drop {drop:.2f} pp > max_int8_accuracy_drop {g.max_int8_accuracy_drop}")
    return {"passed": not failures, "failures": failures, "checked": checked}


def _assemble(recipe: Recipe, dense: dict, final: dict, results: list[dict], extra: dict, ctx) -> dict:
    gates = check_gates(recipe, dense, final, extra)
    out = {
        "name": recipe.name,
        "status": "passed" if gates["passed"] else "gates_failed",
        "seed": recipe.seed,
        "device": str(ctx.device),
        "torch": torch.__version__,
        "dense": {k: dense[k] for k in ("accuracy", "loss", "params", "nonzero_params", "macs") if k in dense},
        "final": {k: final[k] for k in ("accuracy", "loss", "params", "nonzero_params", "macs") if k in final},
        "stages": results,
        **extra,
        "gates": gates,
    }
    out.setdefault("export", {})
    out.setdefault("benchmark", [])
    return out
