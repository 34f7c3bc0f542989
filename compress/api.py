"""The Python API: every step of a recipe as a function on your own model and data.

    import compress
    result = compress.prune(model, example_inputs, importance="l2", ratio=0.5)   # in place
    compress.sparsify(model, pattern="2:4")                                      # masks that hold in any loop
    compress.finetune(model, teacher, train_loader, epochs=1)                    # the stages' training loop
    compress.save(model, "ckpt/"); model = compress.load("ckpt/")                # arch.json + safetensors
    compress.save_pretrained(hf_model, "out/")                                    # Hugging Face directory
    compress.export_onnx(model, "model.onnx", example_inputs)                     # masks baked in
    report = compress.check_sparsity("model.onnx")
    summary = compress.run("recipe.yaml", out="runs/x")                           # a whole recipe

Each function drives the same code the recipe's stages run (``prune`` and ``sparsify`` call the
stage's own ``run`` with a context built from your objects; ``finetune`` calls the training loop),
returns plain objects (the model, dataclasses) and raises the typed errors of
:mod:`compress.errors` (``InputError`` for a bad argument, naming it; ``GateError``;
``EnvironmentFailure``; ``DivergedError``), never ``SystemExit``.

Loading is data, not code: :func:`load` rebuilds only model-zoo factories (and Hugging Face models
from their saved config) unless ``allow=["mypkg"]`` or ``trust_code=True`` says otherwise, and it
never reaches the network.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import paths
from .errors import GateError, InputError
from .metrics import count_macs, count_params
from .model_io import ORIGIN_ATTR, load_portable, read_json_file, save_portable
from .modules import device_of
from .sparsity import masks as _masks
from .tasks import build_objective

if TYPE_CHECKING:
    from .recipe import Recipe

# The recipe and pipeline layers (every stage, Torch-Pruning, the data layer) are imported inside
# run() and search() only: ``compress check-sparsity`` and ``compress.load`` start in a fraction of
# the time when they are not needed.

__all__ = ["prune", "sparsify", "finetune", "export_onnx", "check_sparsity", "run", "search", "save", "load",
           "save_pretrained", "strip", "PruneResult", "SparsifyResult", "FinetuneResult", "ExportResult", "SparsityReport",
           "RunResult"]


# ---------------------------------------------------------------------------------------------
# Results

@dataclass
class PruneResult:
    """What :func:`prune` did. ``model`` is the same object that was passed in, pruned in place."""

    model: nn.Module
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    ratio: float | list[float]
    metrics: dict[str, Any] = field(default_factory=dict)  # the prune stage's metrics, guards included

    @property
    def macs_kept(self) -> float:
        return self.macs_after / max(1, self.macs_before)

    @property
    def params_kept(self) -> float:
        return self.params_after / max(1, self.params_before)


@dataclass
class SparsifyResult:
    model: nn.Module
    pattern: str
    method: str
    layers: list[str]                 # the layers that got an N:M mask
    skipped: list[dict[str, str]]     # {"layer": name, "reason": why}
    sparsity: float                   # zeros / weights in the sparsified layers


@dataclass
class FinetuneResult:
    model: nn.Module
    steps: int
    epochs: int
    train_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ExportResult:
    path: Path
    parity: float | None            # max |ONNX Runtime - torch| on the example inputs; None when not checked
    top1_agreement: float | None    # percent of example inputs whose top-1 class agrees


@dataclass
class SparsityReport:
    """:func:`compress.deploy.onnx_io.check_sparsity` as a dataclass (``layers``: one dict per
    Conv/Gemm/MatMul with a constant weight)."""

    file: str
    pattern: str
    layers: list[dict[str, Any]]
    sparse_layers: int
    eligible_layers: int
    total_layers: int
    require: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("file", "pattern", "layers", "sparse_layers", "eligible_layers",
                                             "total_layers")}
        if self.require is not None:
            out["require"] = self.require
        return out


@dataclass
class RunResult:
    name: str
    run_dir: Path
    status: str | None             # None on torchrun ranks other than 0
    summary: dict[str, Any] | None

    def model(self, which: str = "final", **kw) -> nn.Module:
        """The run's model (see :func:`load`)."""
        return load(self.run_dir, which, **kw)


# ---------------------------------------------------------------------------------------------
# A stage context built from the caller's objects

def _batches(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` ``(x, y)`` batches of a loader (any iterable of pairs)."""
    out = []
    for item in itertools.islice(loader, n):
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise InputError("must yield (inputs, labels) batches", field="calibration")
        out.append((item[0], item[1]))
    if not out:
        raise InputError("yielded no batch", field="calibration")
    return out


class _CallerContext:
    """What a stage reads from its context (``compress.stages.base.StageContext``), taken from the
    caller's model, example inputs and loaders instead of a recipe's data."""

    def __init__(self, model: nn.Module, example: torch.Tensor, device: torch.device, *,
                 calibration=None, train_loader=None, seed: int = 0):
        self.model, self.example, self.device = model, example, device
        self.calibration, self.loader = calibration, train_loader
        self.index, self.run_seed, self.dense, self.stage_dir = 0, seed, None, None
        self.objective = build_objective(None)  # classification: the loss data-aware criteria calibrate with
        self.training_objective = None  # the loop's default: classification (cross-entropy / Hinton distillation)

    @property
    def seed(self) -> int:
        return paths.stage_seed(self.run_seed, self.index)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.example.shape[1:])

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        return self.example[:batch].to(self.device)

    def stats(self, model: nn.Module | None = None) -> dict[str, int]:
        m = model if model is not None else self.model
        return {"params": count_params(m), "macs": count_macs(m, self.input_shape, self.device)}

    def calibration_batches(self, n: int, batch_size: int | None = None):
        if self.calibration is None:
            raise InputError("this criterion or method needs data: pass calibration=<a loader of (x, y) batches>",
                             field="calibration")
        return _batches(self.calibration, n)

    def train_loader(self, batch_size: int | None = None, seed_offset: int = 0, shuffle: bool = True):
        if self.loader is None:
            raise InputError("this setting trains: pass train_loader=<a loader of (x, y) batches>",
                             field="train_loader")
        return self.loader

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """No test data here: the caller evaluates the model in its own loop. A stage's metrics
        hold NaN for the accuracy a recipe run would measure (the API results leave it out)."""
        return {"accuracy": math.nan}

    def headline(self, metrics: dict[str, float] | None = None) -> dict[str, float]:
        """``{"accuracy": value}``, as a recipe's stage context reports its task's primary metric."""
        metrics = self.evaluate() if metrics is None else metrics
        return {"accuracy": metrics["accuracy"]}


def _example(example_inputs, field: str = "example_inputs") -> torch.Tensor:
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1:
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 1 or example_inputs.shape[0] < 1:
        raise InputError("must be one batched input tensor, e.g. torch.randn(1, 3, 32, 32)", field=field)
    return example_inputs


def _stage_config(kind: str, settings: dict[str, Any]):
    """The stage's own pydantic config: the same validation (and one-line errors) as a recipe."""
    from pydantic import ValidationError

    from .stages import STAGES

    spec = STAGES.get(kind)
    try:
        return spec, spec.config(kind=kind, **settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != kind) or kind
        raise InputError(err["msg"].removeprefix("Value error, "), field=where) from None


# ---------------------------------------------------------------------------------------------
# The steps

def prune(model: nn.Module, example_inputs: torch.Tensor, *, importance: str = "l2", ratio: float = 0.5,
          target: Mapping[str, float] | None = None, scope: str = "global",
          ratios: Mapping[str, float] | None = None, guards: Mapping[str, Any] | None = None,
          ignore: Sequence[str] | None = None, heads: Mapping[str, Any] | None = None, steps: int = 1,
          max_ratio: float = 0.9, calibration: Iterable | None = None, calibration_batches: int = 4,
          allow_noop: bool = False, **options: Any) -> PruneResult:
    """Remove whole channels (and every coupled channel) in place, within the guards.

    ``importance``: a criterion from ``compress.structured.criteria.IMPORTANCES`` (``l1``, ``l2``,
    ``taylor``, ``obs`` ...; data-aware ones read ``calibration``, an iterable of ``(x, y)``).
    ``ratio``: fraction removed per group (``scope="uniform"``) or overall (``"global"``); or
    ``target={"macs": 0.5}`` / ``{"params": 0.4}`` (fraction kept, found by bisection);
    ``scope="per_layer"`` with ``ratios={"layers.0.*": 0.3}``. ``guards``: the prune stage's
    ``guards`` block (``first_conv_max_ratio``, ``classifier``, ``min_channels``, ``round_to``).
    ``ignore``: module-name patterns never pruned (default: the classifier). ``heads``:
    ``{"ratio": 0.25, "head_dims": True}`` removes whole attention heads. Other keywords are the
    prune stage's fields (``obs_update``, ``early_bird`` needs ``train_loader``...).

    Raises InputError naming the argument (an unknown criterion, a ratio out of range, nothing
    pruned unless ``allow_noop``) and ModelBreakError when the pruned model no longer runs."""
    example = _example(example_inputs)
    settings = {"importance": importance, "ratio": ratio, "scope": scope, "steps": steps, "max_ratio": max_ratio,
                "calibration_batches": calibration_batches, "allow_noop": allow_noop, **options}
    for key, value in (("target", target), ("ratios", ratios), ("guards", guards), ("ignore", ignore),
                       ("heads", heads)):
        if value is not None:
            settings[key] = dict(value) if isinstance(value, Mapping) else list(value)
    train_loader = settings.pop("train_loader", None)
    spec, cfg = _stage_config("prune", settings)
    ctx = _CallerContext(model, example, device_of(model), calibration=calibration, train_loader=train_loader)
    out = spec.run(cfg, ctx)
    m = out.metrics
    return PruneResult(model=ctx.model, params_before=m["params_before"], params_after=m["params_after"],
                       macs_before=m["macs_before"], macs_after=m["macs_after"], ratio=m["ratio"],
                       metrics={k: v for k, v in m.items() if k != "accuracy_after_prune"})


def sparsify(model: nn.Module, pattern: str = "2:4", method: str = "magnitude", *,
             calibration: Iterable | None = None, ignore: Sequence[str] | None = None, asp_rule: bool = False,
             calibration_batches: int = 8, **options: Any) -> SparsifyResult:
    """Attach N:M masks (at most N non-zeros in every M consecutive input channels) to every
    eligible Conv/Linear, in place. ``method="sparsegpt"`` chooses the masks (and updates the
    kept weights) from ``calibration``, an iterable of ``(x, y)`` batches.

    The masks hold in your own training loop: plain ``loss.backward(); opt.step()`` keeps every
    masked weight at zero (see :mod:`compress.sparsity.masks`); :func:`strip` bakes them in."""
    settings = {"pattern": pattern, "method": method, "asp_rule": asp_rule,
                "calibration_batches": calibration_batches, **options}
    if ignore is not None:
        settings["ignore"] = list(ignore)
    spec, cfg = _stage_config("sparsify", settings)
    example = torch.zeros(1)  # sparsify reads no example input
    ctx = _CallerContext(model, example, device_of(model), calibration=calibration)
    m = spec.run(cfg, ctx).metrics
    return SparsifyResult(model=ctx.model, pattern=m["pattern"], method=m["method"], layers=m["layers_sparsified"],
                          skipped=m["layers_skipped"], sparsity=m["sparsity_in_sparsified_layers"])


def finetune(model: nn.Module, teacher: nn.Module | None, train_loader: Iterable, *, epochs: int = 1,
             max_steps: int | None = None, optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 0.0, schedule: str = "cosine", alpha: float = 0.7, temperature: float = 4.0,
             label_smoothing: float = 0.0, grad_clip: float | None = None, warmup_epochs: float = 0.0,
             device: str | torch.device | None = None) -> FinetuneResult:
    """Train ``model`` in place with the loop the ``finetune`` stage runs: distilled from
    ``teacher`` (``alpha`` * T² KL + (1 - ``alpha``) CE at temperature ``temperature``) when one is
    given, plain cross-entropy when ``teacher`` is None. Masks stay fixed. ``train_loader``: any
    iterable of ``(x, y)`` with a length. A NaN loss raises DivergedError."""
    from pydantic import ValidationError

    from .train.config import DistillConfig, FinetuneBlock, OptimizerConfig
    from .train.loop import train

    try:
        block = FinetuneBlock(epochs=epochs, max_steps=max_steps, warmup_epochs=warmup_epochs,
                              label_smoothing=label_smoothing, grad_clip=grad_clip,
                              optimizer=OptimizerConfig(name=optimizer, lr=lr, momentum=momentum,
                                                        weight_decay=weight_decay, schedule=schedule),
                              distill=DistillConfig(alpha=alpha, temperature=temperature) if teacher is not None
                              else None)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(err["msg"].removeprefix("Value error, "), field=str(err["loc"][-1])) from None
    if not hasattr(train_loader, "__len__"):
        raise InputError("must have a length (a DataLoader or a list of (x, y) batches)", field="train_loader")
    dev = torch.device(device) if device is not None else device_of(model)
    res = train(model, train_loader, block, dev, teacher=teacher, distill=block.distill, description="finetune")
    return FinetuneResult(model=model, steps=res.steps, epochs=res.epochs_run,
                          train_loss=res.history[-1]["train_loss"] if res.history else None, history=res.history)


def strip(model: nn.Module) -> nn.Module:
    """Bake every weight mask into plain weights and remove the mask buffers and hooks (in place;
    returns ``model``): what an exporter or another framework should see."""
    return _masks.strip(model)


def export_onnx(model: nn.Module, path: str | Path, example_inputs: torch.Tensor, *, opset: int = 17,
                dynamic_batch: bool = True, exporter: str = "torchscript", external_data: bool | None = None,
                check: bool = True) -> ExportResult:
    """Write ``model`` (a copy with its masks baked in; the model itself is untouched) to ONNX,
    atomically, with the exporter the ``export`` stage uses. ``check``: compare ONNX Runtime with
    torch on ``example_inputs`` and report the largest difference."""
    from .deploy.onnx_io import export_onnx as write_onnx
    from .deploy.onnx_io import parity

    example = _example(example_inputs)
    if exporter not in ("torchscript", "dynamo"):
        raise InputError(f"must be 'torchscript' or 'dynamo', got {exporter!r}", field="exporter")
    plain = strip(copy.deepcopy(model)).cpu().eval()
    out = write_onnx(plain, tuple(example.shape[1:]), path, opset=opset, dynamic_batch=dynamic_batch,
                     exporter=exporter, external_data=external_data, batch=example.shape[0])
    checked = parity(plain, out, example.cpu()) if check else None
    return ExportResult(path=Path(out), parity=checked["parity_max_abs_error"] if checked else None,
                        top1_agreement=checked["parity_top1_agreement"] if checked else None)


def _require_rule(text: str) -> tuple[str, float]:
    """``require``: ``all`` | a layer count (``3``) | a fraction of the eligible layers (``0.8``)."""
    t = str(text).strip().lower()
    if t == "all":
        return "all", 1.0
    try:
        if "." in t:
            f = float(t)
            if 0 < f <= 1:
                return "fraction", f
        else:
            k = int(t)
            if k >= 1:
                return "count", k
    except ValueError:
        pass
    raise InputError(f"must be 'all', a layer count >= 1 or a fraction in (0, 1] such as 0.8; got {text!r}",
                     field="--require")


def check_sparsity(path: str | Path, pattern: str = "2:4", require: str | int | float | None = None) -> SparsityReport:
    """Whether each Conv/Gemm/MatMul weight of an ONNX file holds N:M along TensorRT's reduction
    axis. ``require`` (``"all"``, a layer count, or a fraction of the eligible layers) raises
    GateError when too few do (the report is attached to the error as ``.report``)."""
    from .deploy.onnx_io import check_sparsity as read_sparsity
    from .sparsity.n_m import parse_pattern

    try:
        n, m = parse_pattern(pattern)
    except ValueError as exc:
        raise InputError(str(exc), field="--pattern") from None
    rule = _require_rule(str(require)) if require is not None else None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file {str(path)!r} does not exist", field="onnx_file")
    try:
        rep = read_sparsity(path, n, m)
    except Exception as exc:  # not an ONNX file
        raise InputError(f"cannot read {str(path)!r} as ONNX: {str(exc).splitlines()[0][:200]}",
                         field="onnx_file") from None
    report = SparsityReport(**rep)
    if rule is None:
        return report
    held, eligible = report.sparse_layers, report.eligible_layers
    kind, value = rule
    needed = eligible if kind == "all" else int(value) if kind == "count" else math.ceil(value * eligible - 1e-9)
    failure = None
    if eligible == 0:
        failure = (f"--require {require}: no eligible layer (no Conv/Gemm/MatMul with a constant weight whose "
                   f"reduction dim is a multiple of {m}) in {str(path)!r}")
    elif held < needed:
        failure = f"--require {require}: {held} of {eligible} eligible layers hold {report.pattern}, needs {needed}"
    report.require = {"rule": str(require), "needed": needed if eligible else None, "met": failure is None}
    if failure is not None:
        err = GateError([failure])
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report


# ---------------------------------------------------------------------------------------------
# Saving and loading

def save(model: nn.Module, directory: str | Path, *, factory: str | None = None,
         kwargs: Mapping[str, Any] | None = None, input_shape: Sequence[int] | None = None) -> Path:
    """Write a portable checkpoint (``arch.json`` + ``model.safetensors``, no pickle) that
    :func:`load` rebuilds, pruned widths and masks included; a recipe takes it as
    ``model.checkpoint: DIR``.

    A model built by compress (a recipe, :func:`load`, a zoo factory through
    ``compress.model_io.build_model``, a Hugging Face directory) knows its factory; for any other
    model pass ``factory="mypkg.models:build"`` (and its ``kwargs``): the function that builds the
    unpruned model."""
    directory = Path(directory)
    origin = getattr(model, ORIGIN_ATTR, None) or {}
    spec = factory or origin.get("factory")
    if spec is None:
        raise InputError("this model was not built by compress: pass factory='module:callable' (the function "
                         "that builds it, unpruned) and its kwargs", field="factory")
    if factory is not None and ":" in factory and factory.partition(":")[0] == "__main__":
        raise InputError("a factory in __main__ cannot be imported by another process: move it to a module",
                         field="factory")
    kw = dict(kwargs if kwargs is not None else (origin.get("kwargs", {}) if factory is None else {}))
    shape = list(input_shape) if input_shape is not None else origin.get("input_shape")
    directory.mkdir(parents=True, exist_ok=True)
    save_portable(model, directory, spec, kw, shape)
    return directory


def save_pretrained(model: nn.Module, directory: str | Path):
    """A Hugging Face model (pruned or not) as a ``save_pretrained`` directory: safetensors with
    masks baked in and a config describing the pruned widths and head counts, so transformers'
    ``from_pretrained(directory)`` rebuilds it. Where the config cannot describe them (widths that
    differ between layers one config field covers) the result says so (``from_pretrained`` False,
    ``reason``) and the widths are stored in the config as ``compress_pruned_widths``. Either way
    ``directory/compress/`` holds compress's checkpoint, and :func:`load` of the directory is the
    documented way back. Returns :class:`compress.zoo.hf.PretrainedSave`."""
    from .zoo.hf import COMPRESS_FOLDER, config_dict
    from .zoo.hf import save_pretrained as write_pretrained

    result = write_pretrained(model, directory)
    if getattr(model, ORIGIN_ATTR, None):
        save(model, Path(directory) / COMPRESS_FOLDER)
    else:  # built outside compress: its config rebuilds the architecture, arch.json restores the widths
        save(model, Path(directory) / COMPRESS_FOLDER, factory="hf_pretrained",
             kwargs={"config": config_dict(model), "task": None})
    return result


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


def load(path: str | Path, which: str = "final", *, allow: Iterable[str] = (),
         trust_code: bool = False) -> nn.Module:
    """A model from a run directory or a checkpoint folder written by :func:`save`.

    ``which`` (run directories): ``final`` (the compressed model), ``dense`` (the teacher), or a
    stage folder name (``01-prune``). Masks come back with their hooks, so they hold in your own
    training loop. Only model-zoo factories (and Hugging Face models, rebuilt from their saved
    config) are rebuilt unless ``allow`` names the factory's module (a prefix: ``allow=["mypkg"]``
    allows ``mypkg.models:net``) or ``trust_code=True``. Never touches the network. Damaged or
    missing files raise :class:`~compress.errors.InputError` naming the file; a factory whose module
    is not importable here names the module and the portable alternative (``model.pt2``)."""
    path = Path(path)
    allow = tuple(allow)
    if (path / "arch.json").is_file() and not (path / paths.RECIPE).is_file():
        return load_portable(path, allow=allow, trust_code=trust_code)
    if (path / "config.json").is_file() and not (path / paths.RECIPE).is_file():  # a save_pretrained directory
        from .zoo.hf import COMPRESS_FOLDER

        if (path / COMPRESS_FOLDER / "arch.json").is_file():  # written by compress.save_pretrained: every width
            return load_portable(path / COMPRESS_FOLDER, allow=allow, trust_code=trust_code)
        from .model_io import build_model

        return build_model("hf_pretrained", {"path": str(path)}, field=str(path)).eval()
    if which == "final":
        folder = final_checkpoint(path)
        _check_stage(folder)
    elif which == "dense":
        folder = paths.dense_dir(path)
        if not paths.is_done(folder):
            raise InputError("no dense teacher in this run directory (dense/DONE missing)", field=str(path))
    else:
        if Path(which).name != which or which in (".", ".."):
            raise InputError("must be 'final', 'dense' or a stage folder name such as '01-prune'", field="which")
        folder = path / "stages" / which
        if not folder.is_dir():
            raise InputError(f"no stage folder {which!r} in this run directory", field=str(path))
        _check_stage(folder)
    return load_portable(folder, allow=allow, trust_code=trust_code)


# ---------------------------------------------------------------------------------------------
# Whole recipes

def _resolve(recipe: Recipe | str | Path, overrides: Sequence[str]) -> Recipe:
    from .recipe import Recipe, apply_overrides, load_recipe, validate_data

    if isinstance(recipe, Recipe):
        return validate_data(apply_overrides(recipe.model_dump(mode="json"), list(overrides))) if overrides else recipe
    return load_recipe(recipe, list(overrides))


def run(recipe: Recipe | str | Path, out: str | Path | None = None, *, overrides: Sequence[str] = (),
        resume: bool = False, device: str | None = None, threads: int | None = None) -> RunResult:
    """Run a recipe (a file, or a validated :class:`~compress.recipe.Recipe`) end to end into
    ``out`` (default ``runs/<name>``). ``overrides``: ``PATH=VALUE`` items as for ``--set``;
    ``resume``: skip completed stages; ``threads``: intra-op threads for training (default: chosen
    from the idle cores). Under torchrun, ranks other than 0 get ``status`` and ``summary`` None
    (rank 0 writes the run directory). Raises GateError, after writing every artifact, when a gate
    fails (the summary is attached as ``.summary``)."""
    from .pipeline.runner import run_recipe

    r = _resolve(recipe, list(overrides) + ([f"device={device}"] if device else []))
    run_dir = Path(out) if out is not None else Path("runs") / r.name
    try:
        summary = run_recipe(r, run_dir, resume=resume, threads=threads)
    except GateError as exc:
        summary_file = run_dir / paths.SUMMARY
        exc.summary = read_json_file(summary_file) if summary_file.is_file() else None  # type: ignore[attr-defined]
        raise
    if summary is None:  # a torchrun rank other than 0
        return RunResult(name=r.name, run_dir=run_dir, status=None, summary=None)
    return RunResult(name=r.name, run_dir=run_dir, status=summary["status"], summary=summary)


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
    from .pipeline.run_dir import rerun_from, same_prefix
    from .pipeline.runner import run_recipe

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
