"""``compress benchmark``: time a run directory's models, or bare ONNX files, on this machine.

A run directory is read through the artifacts its last completed stage recorded in ``result.json``
(``artifacts.onnx.fp32`` the compressed model, ``dense_fp32`` the dense one), never by guessing
file names; the torch backends load the models from the portable checkpoints (the last completed
stage's folder, and ``dense/``). One or two ONNX files (``model.onnx [dense.onnx]``) need nothing
else. No dataset is read: inputs are random tensors of the shapes and types in the ONNX graph
(:mod:`compress.deploy.inputs`), and the timing is the benchmark stage's
(:func:`compress.deploy.bench.time_backends`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .. import paths
from ..deploy import tensorrt as trb
from ..deploy.backends import BACKENDS
from ..deploy.bench import Subject, record, time_backends, write_outputs
from ..deploy.files import int8_onnx_beside
from ..deploy.inputs import load_graph
from ..deploy.timing import BackendUnavailable
from ..errors import InputError
from ..model_io import load_portable
from ..stages.artifacts import Artifacts

TORCH_BACKENDS = ("torch", "torch_compile")
PRECISIONS = ("fp32", "fp16", "int8", "best")
ENGINES_DIR = "engines"


@dataclass
class Target:
    """What TARGET named: the files to time and, for a run directory, the checkpoints."""

    compressed: Subject
    dense: Subject | None
    run_dir: Path | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)  # role -> portable checkpoint folder

    def describe(self) -> dict:
        out = {"kind": "run_dir" if self.run_dir else "onnx",
               "compressed": str(self.compressed.onnx), "dense": str(self.dense.onnx) if self.dense else None}
        if self.run_dir is not None:
            out["run_dir"] = str(self.run_dir)
            out["checkpoints"] = {role: str(p) for role, p in self.checkpoints.items()}
        return out


def resolve_target(targets: Sequence[Path]) -> Target:
    """A run directory, or one or two ONNX files (compressed first), checked: every file exists
    and is an ONNX model."""
    targets = [Path(t) for t in targets]
    if len(targets) == 1 and targets[0].is_dir():
        return _run_dir_target(targets[0])
    if not 1 <= len(targets) <= 2:
        raise InputError(f"give a run directory, or one or two ONNX files (compressed, then dense); got "
                         f"{len(targets)} paths", field="TARGET")
    for t in targets:
        if t.is_dir():
            raise InputError(f"{str(t)!r} is a directory: give a run directory alone, or ONNX files", field="TARGET")
        load_graph(t)  # exists and is ONNX, or a one-line error
    return Target(Subject(targets[0]), Subject(targets[1]) if len(targets) == 2 else None)


def _run_dir_target(run_dir: Path) -> Target:
    last = paths.last_completed_stage(run_dir)
    if last is None:
        raise InputError(f"{str(run_dir)!r} is not a run directory (no completed stage under "
                         f"{str(run_dir / 'stages')!r}) and not an ONNX file", field="TARGET")
    try:
        rec = json.loads((last / paths.RESULT).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {str(last / paths.RESULT)!r}: {exc}", field="TARGET") from None
    onnx = Artifacts.from_dict(rec.get("artifacts")).onnx
    if onnx.fp32 is None:
        raise InputError(f"run directory {str(run_dir)!r} has no ONNX export (its last completed stage, {last.name}, "
                         "records none): add an export stage to the recipe and re-run with --resume, or pass "
                         "ONNX files", field="TARGET")
    files = {"compressed": run_dir / onnx.fp32, "dense": run_dir / onnx.dense_fp32 if onnx.dense_fp32 else None}
    for role, f in files.items():
        if f is not None and not f.is_file():
            raise InputError(f"file {str(f)!r} does not exist (the {role} ONNX file that {last.name}/{paths.RESULT} "
                             "records: copy the whole run directory)", field="TARGET")
        if f is not None:
            load_graph(f)
    dense_dir = paths.dense_dir(run_dir)
    checkpoints = {"compressed": last, **({"dense": dense_dir} if paths.is_done(dense_dir) else {})}
    return Target(Subject(files["compressed"]), Subject(files["dense"]) if files["dense"] else None,
                  run_dir=run_dir, checkpoints=checkpoints)


def load_models(target: Target) -> None:
    """The torch backends time the models themselves: load them from the run's checkpoints."""
    if target.run_dir is None:
        raise InputError("the torch backends time the model itself, which ONNX files do not hold: give a run "
                         "directory, or use onnxruntime, onnxruntime_int8 or tensorrt", field="--backend")
    for role, subject in (("compressed", target.compressed), ("dense", target.dense)):
        if subject is None:
            continue
        ckpt = target.checkpoints.get(role)
        if ckpt is None:
            raise InputError(f"the run directory has no {role} checkpoint for the torch backends", field="--backend")
        subject.model = load_portable(ckpt)
        shape = json.loads((ckpt / "arch.json").read_text()).get("input_shape")
        if not shape:
            raise InputError(f"{str(ckpt / 'arch.json')!r} records no input_shape", field="--backend")
        subject.input_shape = tuple(shape)


def split_list(values: Sequence[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (options repeatable or comma-separated)."""
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def parse_batches(values: Sequence[str]) -> list[int]:
    try:
        sizes = [int(p) for p in split_list(values)]
    except ValueError:
        raise InputError(f"must be positive integers, e.g. 1,8,32 (got {','.join(values)!r})", field="--batch") from None
    if not sizes or any(b < 1 for b in sizes):
        raise InputError(f"must be positive integers, e.g. 1,8,32 (got {','.join(values)!r})", field="--batch")
    return list(dict.fromkeys(sizes))


def parse_dims(values: Sequence[str]) -> dict[str, int]:
    out = {}
    for v in split_list(values):
        name, sep, size = v.partition("=")
        if not sep or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise InputError(f"must look like NAME=N with N >= 1, e.g. seq=128 (got {v!r})", field="--dim")
        out[name.strip()] = int(size)
    return out


def check_backends(backends: Sequence[str], target: Target, precision: str, device: str) -> str:
    """Refuse, before anything is timed, what cannot run: an unknown backend, a torch backend
    without checkpoints, TensorRT or CUDA missing here, an int8 file that is not there. Returns the
    torch device to use."""
    if not backends:
        raise InputError("needs at least one backend", field="--backend")
    for b in backends:
        if b not in BACKENDS:
            raise InputError(f"unknown backend {b!r} (known: {', '.join(BACKENDS.names())})", field="--backend")
    if precision not in PRECISIONS:
        raise InputError(f"must be one of {', '.join(PRECISIONS)} (got {precision!r})", field="--precision")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"must be auto, cpu or cuda (got {device!r})", field="--device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if any(b in TORCH_BACKENDS for b in backends):
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("CUDA requested but no GPU is visible", field="--device")
        load_models(target)  # refused for ONNX files: they hold no torch model
    if "tensorrt" in backends:
        try:
            trb.require_tensorrt()
        except BackendUnavailable as exc:
            raise InputError(f"backend 'tensorrt' cannot run here: {exc}", field="--backend") from None
    if "onnxruntime_int8" in backends or ("tensorrt" in backends and precision in ("int8", "best")):
        for s in (target.compressed, target.dense):
            if s is not None:
                int8_onnx_beside(s.onnx)
    return device


def benchmark_target(targets: Sequence[Path], backends: Sequence[str], batch_sizes: Sequence[int], *,
                     out: Path, threads: int = 1, warmup: int = 10, iters: int = 100, rounds: int = 10,
                     precision: str = "fp16", dims: dict[str, int] | None = None, device: str = "auto",
                     rebuild: bool = False, argv: Sequence[str] | None = None) -> tuple[dict, list[Path]]:
    """Resolve TARGET, time it on every backend x batch size (dense and compressed interleaved),
    write ``benchmark.json``, ``benchmark.md`` and the plot into ``out``; return the record and
    the files written. TensorRT engines are built into ``out/engines/`` and reused from there
    unless ``rebuild``."""
    for name, v, lo in (("--threads", threads, 1), ("--warmup", warmup, 0), ("--iters", iters, 1),
                        ("--rounds", rounds, 1)):
        if v < lo:
            raise InputError(f"must be >= {lo} (got {v})", field=name)
    target = resolve_target(targets)
    device = check_backends(backends, target, precision, device)
    options = {"device": device, "precision": precision, "dims": dims or {},
               "engine_dir": str(out / ENGINES_DIR), "reuse_engines": not rebuild}

    def unavailable(backend: str, exc: BackendUnavailable) -> None:
        raise InputError(f"backend {backend!r} cannot run here: {exc}", field="--backend") from None

    rows, _ = time_backends(target.compressed, target.dense, backends, batch_sizes, threads=threads, warmup=warmup,
                            iters=iters, rounds=rounds, options=options, on_unavailable=unavailable)
    settings = {"backends": list(backends), "batch_sizes": list(batch_sizes), "threads": threads, "warmup": warmup,
                "iters": iters, "rounds": rounds, "precision": precision, "dims": dims or {}, "torch_device": device}
    rec = record(rows, target.describe(), settings, argv)
    return rec, write_outputs(out, rec)
