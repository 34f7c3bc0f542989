"""The ``compress`` command line. Exit codes: 0 ok, 2 invalid input, 3 a gate failed, 1 a bug.
Invalid input never prints a traceback: one line naming the field or file."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from .errors import (INTERRUPTED, EXIT_BUG, EXIT_DIVERGED, EXIT_ENVIRONMENT, EXIT_GATE, EXIT_INPUT, EXIT_INTERRUPTED,
                     DivergedError, EnvironmentFailure, GateError, InputError, ModelBreakError)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, 2:4-sparsify, distil, export and benchmark PyTorch models from a recipe.")



def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


_EXIT_OF = {InputError: EXIT_INPUT, ModelBreakError: EXIT_INPUT, EnvironmentFailure: EXIT_ENVIRONMENT,
            DivergedError: EXIT_DIVERGED}


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _guard(fn):
    """Map exceptions to exit codes; no traceback for the user's mistakes."""
    try:
        return fn()
    except GateError as exc:
        _err(f"gates failed: {exc}")
        raise typer.Exit(EXIT_GATE)
    except tuple(_EXIT_OF) as exc:  # one line, the code documented in compress/errors.py
        _err(str(exc))
        raise typer.Exit(next(code for kind, code in _EXIT_OF.items() if isinstance(exc, kind)))
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _err("interrupted")
        _said_interrupted.append(True)
        raise typer.Exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if _caused_by_interrupt(exc) or INTERRUPTED:  # Ctrl-C inside a C extension's import surfaces as
            # ImportError, or as a later error of a half-initialised module
            _err("interrupted")
            _said_interrupted.append(True)
            raise typer.Exit(EXIT_INTERRUPTED)
        traceback.print_exc()
        raise typer.Exit(EXIT_BUG)


def _show_version(value: bool) -> None:
    if value:
        from .version import __version__

        typer.echo(f"compress {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or stage logs (CI)"),
          version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="print the version and exit")):
    from .progress import set_quiet

    set_quiet(quiet)


@app.command("recipes")
def recipes_cmd():
    """List the recipes installed with the package (copy one with `compress init NAME`)."""

    def go():
        from .recipes import packaged

        rows = packaged()
        width = max(len(r.name) for r in rows)
        for r in rows:
            typer.echo(f"{r.name:{width}s}  {r.summary}")

    _guard(go)


@app.command("init")
def init_cmd(name: str = typer.Argument(..., help="a packaged recipe (see `compress recipes`)"),
             directory: Optional[Path] = typer.Argument(None, metavar="[DIR]",
                                                        help="folder (or file name) to copy it to; default: here")):
    """Copy a packaged recipe to start from; never overwrites a file."""

    def go():
        from .recipes import copy_to

        dest = copy_to(name, directory)
        typer.echo(f"wrote {dest}; run it with: compress run {dest}")

    _guard(go)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>)"),
    resume: bool = typer.Option(False, "--resume", help="skip completed stages and continue"),
    set_: List[str] = typer.Option([], "--set", help="override a field: PATH=VALUE, e.g. stages.1.ratio=0.3"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (overrides the recipe)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or stage logs (CI)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024,
                                          help="intra-op threads for training (overrides the recipe's threads; "
                                               "default: from the usable cores, fixed per machine)"),
):
    """Run a recipe end to end (under torchrun: data-parallel training, rank 0 writes)."""
    if quiet:
        from .progress import set_quiet

        set_quiet(True)

    def go():
        from .api import run as run_recipe

        ran = run_recipe(recipe, out, overrides=list(set_), resume=resume, device=device, threads=threads)
        if ran.summary is not None:  # None on torchrun ranks other than 0
            _print_summary(ran.summary, ran.run_dir)

    _guard(go)


def _print_summary(summary: dict, run_dir: Path) -> None:
    from .progress import console, is_quiet

    d, f = summary["dense"], summary["final"]
    key = (summary.get("task") or {}).get("primary_metric", "accuracy")
    unit = "%" if key in ("accuracy", "miou") else ""
    lines = [f"{summary['name']}: {summary['status']}",
             f"  {key} {d[key]:.2f}{unit} -> {f[key]:.2f}{unit}   params {d['params']:,} -> {f['params']:,}"
             f"   MACs {d['macs']:,} -> {f['macs']:,}"]
    for r in summary.get("benchmark", []):
        if "speedup" in r:
            lines.append(f"  {r['backend']} batch {r['batch_size']}: {r['dense_ms_p50']:.3f} ms -> "
                         f"{r['compressed_ms_p50']:.3f} ms ({r['speedup']:.2f}x)")
    lines.append(f"  run directory: {run_dir}")
    if is_quiet():
        typer.echo("\n".join(lines))
    else:
        console.print("\n".join(lines), highlight=False)


@app.command()
def validate(recipe: Path = typer.Argument(...),
             set_: List[str] = typer.Option([], "--set", help="override a field: PATH=VALUE"),
             no_preflight: bool = typer.Option(False, "--no-preflight",
                                               help="check the schema only: do not build the model or read data")):
    """Check a recipe: the schema, then the pre-run checks (the model builds and runs the input
    shape, its logits cover the labels, the data reads). Nothing is trained or downloaded."""

    def go():
        from .recipe import load_recipe

        r = load_recipe(recipe, list(set_))
        checked = None
        if not no_preflight:
            from .preflight import preflight

            checked = preflight(r.model, r.data, r.seed, download=False, task=r.task)
        typer.echo(f"{recipe}: ok ({len(r.stages)} stages: {', '.join(s.kind for s in r.stages)})")
        if checked is not None:
            typer.echo(f"  preflight: {checked.describe()}")

    _guard(go)


@app.command()
def inspect(recipe: Path = typer.Argument(...),
            format: str = typer.Option("text", "--format", help="text | json"),
            set_: List[str] = typer.Option([], "--set")):
    """Model summary: params, MACs and the prunable channel groups (coupled layers)."""

    def go():
        from .example_inputs import example_input
        from .metrics import count_macs, count_params
        from .preflight import check_declared_classes, probe_model
        from .structured.pruner import annotate_guards, describe_groups, io_layers
        from .recipe import load_recipe

        if format not in ("text", "json"):
            raise InputError("must be text or json", field="--format")
        r = load_recipe(recipe, list(set_))
        probe = probe_model(r.model)  # the model checks of validate/run: the same one-line errors
        check_declared_classes(probe, r.model, r.data)
        model = probe.model
        if r.model.input_shape is None:
            raise InputError("inspect builds its dependency graph from a random input of this shape; give it "
                             "(models with dict inputs: inspect is not available yet)", field="model.input_shape")
        shape = tuple(r.model.input_shape)
        prune_cfg = next((s for s in r.stages if s.kind == "prune"), None)
        if prune_cfg is None:  # the defaults of a prune stage
            from .stages.prune import Config as PruneConfig

            prune_cfg = PruneConfig()
        example = example_input(model, shape, 1, seed=None)
        kw = prune_cfg.pruner_kwargs()
        _, output = io_layers(model, example)
        ignore = list(prune_cfg.ignore or []) + ([output] if kw["guards"].classifier and output else [])
        groups = annotate_guards(describe_groups(model, example, ignore), model, example,
                                 ratio=prune_cfg.ratio, **kw)
        info = {"model": r.model.factory, "params": count_params(model), "macs": count_macs(model, shape),
                "input_shape": list(shape), "guards": vars(kw["guards"]), "ratio": prune_cfg.ratio,
                "scope": prune_cfg.scope, "groups": groups}
        if format == "json":
            typer.echo(json.dumps(info, indent=2))
            return
        typer.echo(f"model {info['model']}: {info['params']:,} params, {info['macs']:,} MACs per sample, "
                   f"input {info['input_shape']}")
        typer.echo(f"{len(groups)} prunable channel groups (guards checked at ratio {prune_cfg.ratio}, "
                   f"scope {prune_cfg.scope}):")
        for i, g in enumerate(groups):
            binds = f"  [guard: {'; '.join(g['guards'])}]" if g["guards"] else ""
            att = g.get("attention")
            heads = f"  [attention {att['module']}: {att['heads']} heads x {att['head_dim']}]" if att else ""
            typer.echo(f"  group {i}: {g['channels']} ch: {', '.join(g['members'])}{binds}{heads}")

    _guard(go)


def _check_out_file(out: Path) -> None:
    """``--out FILE``: refuse a directory, or a path under a file, before writing anything."""
    try:
        if out.is_dir():
            raise InputError(f"{str(out)!r} is a directory; give a file name, e.g. "
                             f"{str(out / 'recipe.schema.json')!r}", field="--out")
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise InputError(f"cannot write {str(out)!r}: {str(parent)!r} is a file, not a directory",
                                     field="--out")
                break
    except OSError as exc:  # a name too long, a loop of links
        raise InputError(f"cannot write {str(out)[:200]!r}: {exc.strerror or exc}", field="--out") from None


def _write_out_file(out: Path, text: str) -> None:
    import errno

    from .io import atomic_write_text

    _check_out_file(out)
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise EnvironmentFailure(f"--out: cannot write {str(out)!r}: {why}") from None
        raise InputError(f"cannot write {str(out)[:200]!r}: {why}", field="--out") from None


@app.command()
def schema(out: Optional[Path] = typer.Option(None, "--out", help="write to a file instead of stdout")):
    """Print the recipe's JSON Schema (for editor completion)."""

    def go():
        from .recipe import recipe_schema

        text = json.dumps(recipe_schema(), indent=2)
        if out:
            _write_out_file(out, text + "\n")
        else:
            typer.echo(text)

    _guard(go)


@app.command()
def search(
    recipe: Path = typer.Argument(..., help="recipe YAML with a search stage"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>)"),
    trials: Optional[int] = typer.Option(None, "--trials", help="trials to add to the study"),
    workers: Optional[int] = typer.Option(None, "--workers", help="parallel trials in this process"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna RDB URL (default: SQLite in the run dir)"),
    set_: List[str] = typer.Option([], "--set", help="override a field: PATH=VALUE"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda"),
):
    """Search per-layer pruning ratios within a latency budget. Runs the recipe up to its search
    stage; re-running continues the same Optuna study (earlier stages are reused)."""

    def go():
        from .api import search as run_search

        ran = run_search(recipe, out, trials=trials, workers=workers, storage=storage,
                         overrides=list(set_) + ([f"device={device}"] if device else []))
        res = ran["search"]
        typer.echo(f"{ran['name']}: {res['trials_total']} trials in study {res['study']} ({res['trials_added']} added)")
        typer.echo(f"  budget: {res['budget_desc']}")
        for row in res["rows"]:
            acc = f"  test acc {row['test_accuracy']:.2f}%" if "test_accuracy" in row else ""
            typer.echo(f"  {row['name']:11s} MACs {row['macs']:>14,}  measured {row['measured_ms']:.3f} ms"
                       f"  predicted {row['predicted_ms']:.3f} ms{acc}")
        typer.echo(f"  chosen: {res['chosen']}; prune block: {ran['stage_dir'] / 'prune_block.yaml'}")

    _guard(go)


@app.command("check-sparsity")
def check_sparsity_cmd(onnx_file: Path = typer.Argument(..., help="model.onnx"),
                       pattern: str = typer.Option("2:4", "--pattern",
                                                   help="N:M: at most N non-zeros in every M weights (2:4, 1:4, 4:8)"),
                       format: str = typer.Option("text", "--format", help="text | json"),
                       require: Optional[str] = typer.Option(
                           None, "--require", help="exit 3 unless enough eligible layers hold the pattern: all | "
                                                   "a count (3) | a fraction of the eligible layers (0.8)")):
    """Report, per Conv/Gemm/MatMul, whether the ONNX weight holds N:M along TensorRT's reduction axis
    (at most N non-zeros in every M consecutive weights); with --require, exit 3 when too few do."""

    def go():
        from .api import check_sparsity

        if format not in ("text", "json"):
            raise InputError("must be text or json", field="--format")
        failure = None
        try:
            report = check_sparsity(onnx_file, pattern, require)
        except GateError as exc:  # print the report first, then exit 3
            report, failure = exc.report, exc
        rep = report.as_dict()
        n, m = (int(v) for v in rep["pattern"].split(":"))
        held, eligible = rep["sparse_layers"], rep["eligible_layers"]
        if format == "json":
            typer.echo(json.dumps(rep, indent=2))
        else:
            for layer in rep["layers"]:
                mark = rep["pattern"] if layer["holds_pattern"] else ("no" if layer["eligible"] else "n/a")
                why = f" ({layer['reason']})" if "reason" in layer else ""
                typer.echo(f"  {mark:6s} {layer['op']:6s} {layer['node']} {layer['shape']} axis {layer['axis']}{why}")
            typer.echo(f"{held} of {eligible} eligible layers hold {rep['pattern']} (at most {n} non-zeros in every "
                       f"{m} weights; {rep['total_layers']} Conv/Gemm/MatMul with a constant weight)")
        if failure is not None:
            raise failure
        if eligible == 0:
            typer.echo(f"warning: no eligible layer in {str(onnx_file)!r}: nothing was checked "
                       "(--require makes this exit 3)", err=True)

    _guard(go)


@app.command()
def benchmark(
    target: List[Path] = typer.Argument(..., metavar="TARGET",
                                        help="a run directory, or one or two ONNX files: compressed, then dense"),
    backend: List[str] = typer.Option(["onnxruntime"], "--backend",
                                      help="onnxruntime | onnxruntime_int8 | torch | torch_compile | tensorrt; "
                                           "repeatable or comma-separated"),
    batch: List[str] = typer.Option(["1,32"], "--batch", help="batch sizes, e.g. 1,8,32"),
    precision: str = typer.Option("fp16", "--precision", help="tensorrt engines: fp32 | fp16 | int8 | best"),
    threads: int = typer.Option(1, "--threads", help="intra-op threads (fixed, so numbers are comparable)"),
    warmup: int = typer.Option(10, "--warmup", help="untimed calls per model first"),
    iters: int = typer.Option(100, "--iters", help="timed calls per model per batch size"),
    rounds: int = typer.Option(10, "--rounds", help="interleaving rounds (order flips each round)"),
    dim: List[str] = typer.Option([], "--dim", help="size of a symbolic input dimension other than the batch: "
                                                    "NAME=N, e.g. seq=128"),
    device: str = typer.Option("auto", "--device", help="torch backends: auto | cpu | cuda"),
    rebuild: bool = typer.Option(False, "--rebuild", help="tensorrt: build engines even where OUT holds them"),
    out: Path = typer.Option(Path("runs/benchmark"), "--out", help="writes benchmark.json, benchmark.md, the plot"),
    format: str = typer.Option("text", "--format", help="text | json (the record on stdout)"),
):
    """Time dense vs compressed on this machine, without the dataset or the recipe's code: TARGET is
    a run directory (its recorded ONNX files) or one or two ONNX files (compressed, then dense)."""

    def go():
        from .pipeline.bench_target import benchmark_target, parse_batches, parse_dims, split_list

        if format not in ("text", "json"):
            raise InputError("must be text or json", field="--format")
        rec, files = benchmark_target(target, split_list(backend), parse_batches(batch), out=out, threads=threads,
                                      warmup=warmup, iters=iters, rounds=rounds, precision=precision,
                                      dims=parse_dims(dim), device=device, rebuild=rebuild)
        if format == "json":
            typer.echo(json.dumps(rec, indent=2))
            return
        t, dev = rec["target"], rec["device"]
        typer.echo(f"{t['compressed']}" + (f" vs {t['dense']}" if t["dense"] else "")
                   + f" ({rec['settings']['threads']} thread(s); {dev['cpu']}" + (f"; {dev['gpu']}" if "gpu" in dev else "")
                   + ")")
        typer.echo(f"  {'backend':16s} {'batch':>5s} {'compressed p50':>15s} {'dense p50':>10s} {'speedup':>8s}")
        for r in rec["rows"]:
            dense = f"{r['dense_ms_p50']:.3f} ms" if "dense_ms_p50" in r else "-"
            speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
            typer.echo(f"  {r['backend']:16s} {r['batch_size']:>5d} {r['compressed_ms_p50']:>12.3f} ms "
                       f"{dense:>10s} {speedup:>8s}")
        typer.echo(f"wrote {', '.join(str(f) for f in files)}")

    _guard(go)


analyze_app = typer.Typer(no_args_is_help=True, help="Analyses: linear mode connectivity, instability.")
app.add_typer(analyze_app, name="analyze")


def _load_any(path: Path, allow=(), trust_code: bool = False):
    """A portable checkpoint folder (arch.json) or a run directory (its final model); only zoo
    factories unless allowed (a run directory is data, not code)."""
    from .api import load
    from .model_io import load_portable

    if (path / "arch.json").is_file():
        return load_portable(path, allow=allow, trust_code=trust_code)
    if path.is_dir():
        return load(path, allow=allow, trust_code=trust_code)
    raise InputError(f"{str(path)!r} is neither a run directory nor a checkpoint folder", field="checkpoint")


@analyze_app.command("interpolate")
def analyze_interpolate(a: Path = typer.Argument(..., help="run directory or checkpoint folder"),
                        b: Path = typer.Argument(..., help="run directory or checkpoint folder"),
                        recipe: Path = typer.Option(..., "--recipe", help="recipe whose data block gives the test set"),
                        points: int = typer.Option(30, "--points", min=2),
                        out: Path = typer.Option(Path("runs/interpolate"), "--out"),
                        set_: List[str] = typer.Option([], "--set"),
                        allow: List[str] = typer.Option([], "--allow", help="also build factories of this module "
                                                        "(prefix) named in arch.json"),
                        trust_code: bool = typer.Option(False, "--trust-code", help="build any factory arch.json "
                                                        "names (only for run directories you trust)")):
    """Test error along the straight line between two networks and its barrier (e.g. dense vs sparse)."""

    def go():
        from .lottery.connectivity import INTERPOLATION_RESULT, interpolate
        from .recipe import load_recipe

        r = load_recipe(recipe, list(set_))
        res = interpolate(_load_any(a, allow, trust_code), _load_any(b, allow, trust_code), r.data, r.model.input_shape, r.seed, out, points=points,
                          names=(str(a), str(b)), label=f"{a.name} -> {b.name}")
        curve = res["curve"]
        typer.echo(f"error {curve[0]['error']:.2f}% -> {curve[-1]['error']:.2f}%, "
                   f"barrier {res['barrier']:.2f} pp; wrote {out / INTERPOLATION_RESULT}")

    _guard(go)


@analyze_app.command("instability")
def analyze_instability(recipe: Path = typer.Argument(..., help="recipe with a lottery stage (its train block)"),
                        rewind: int = typer.Option(0, "--rewind", min=0, help="iteration k of the shared θ_k"),
                        run_dir: Optional[Path] = typer.Option(None, "--run", help="lottery run: use its θ0 and masks"),
                        level: int = typer.Option(0, "--level", min=0, help="with --run: the level's masks"),
                        points: int = typer.Option(30, "--points", min=2),
                        out: Path = typer.Option(Path("runs/instability"), "--out"),
                        set_: List[str] = typer.Option([], "--set")):
    """Train two copies from the same θ_k with different data orders; report the error barrier."""

    def go():
        from .lottery.instability import RESULT, instability
        from .recipe import load_recipe

        r = load_recipe(recipe, list(set_))
        index = next((i for i, st in enumerate(r.stages) if st.kind == "lottery"), None)
        if index is None:
            raise InputError("the recipe has no lottery stage (its train block is used)", field="recipe")
        res = instability(r.model, r.data, r.stages[index].train, r.seed, index, out, rewind=rewind,
                          run_dir=run_dir, level=level, points=points)
        curve = res["curve"]
        typer.echo(f"rewind {rewind}: barrier {res['barrier']:.2f} pp (endpoint errors {curve[0]['error']:.2f}, "
                   f"{curve[-1]['error']:.2f}); wrote {out / RESULT}")

    _guard(go)


_said_interrupted: list[bool] = []


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exc:  # a Ctrl-C outside a command (parsing, the callback) exits 130 silently in typer
        if exc.code == EXIT_INTERRUPTED and not _said_interrupted:
            _err("interrupted")
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
