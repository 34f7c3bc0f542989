"""Checks that can run before training, run before training: by ``compress validate`` and at the
start of ``compress run`` (before the run directory is touched), so a recipe that cannot work
fails in seconds with one line naming the field, not after the first stages.

What is checked, in order:

1. the factory imports and builds with its kwargs (a missing optional extra names its ``pip
   install``; a factory that needs more memory than the machine has is exit 4);
2. one example of ``model.input_shape`` (batch 1, no grad, eval mode) runs through the model and
   its logits can be read (a ``[batch, classes, ...]`` tensor);
3. for the built-in datasets, whose class count is known up front: the model has enough outputs;
4. the data loads (the root exists, every file reads; see :func:`compress.data.build_data`);
5. the data's samples have the recipe's input shape, the model's outputs cover every label, and
   one real sample's cross-entropy loss can be computed (what training does first).

The checks build their own model and draw their example from a local generator inside
:func:`isolated_rng`, so the global random state (and hence the run's results) is exactly what it
would be without them. Data is built once: :func:`preflight` returns it for the runner to use.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from .config import ModelConfig
from .data import DataBundle, build_data, label_bounds
from .data.builtin import MissingData, declared_num_classes
from .data.config import DataConfig
from .example_inputs import example_input
from .errors import InputError, first_line
from .memory import require_memory
from .metrics import call_model, count_params, logits_of, to_device
from .tasks import build_objective
from .model_io import build_with_checkpoint, factory_failure


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving Python's, NumPy's or torch's (CPU) global random state."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@dataclass
class ModelProbe:
    """A freshly built model (eval mode) and the shape of its logits for one example."""

    model: nn.Module
    input_shape: tuple[int, ...] | None
    logits_shape: tuple[int, ...] | None  # None until a real batch ran (no model.input_shape)

    @property
    def num_outputs(self) -> int | None:
        return self.logits_shape[1] if self.logits_shape else None


def _shape(shape) -> str:
    return str(list(shape))


def run_example(model: nn.Module, x: torch.Tensor, spec: str, field: str = "model.input_shape") -> torch.Tensor:
    """``model(x)`` without grad in eval mode, returning logits; any failure is one line naming
    ``field`` (the input does not fit), the factory (no logits) or the machine (out of memory)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)  # a factory may return a model already on a GPU
    if param is not None and param.device != x.device:
        x = x.to(param.device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise factory_failure(exc, spec, field, doing=f"running an input of shape {_shape(x.shape)}") from None
    finally:
        model.train(was_training)
    try:
        logits = logits_of(out)
    except TypeError as exc:
        raise InputError(f"compress cannot read logits from the output of {spec!r}: {exc} (return a tensor "
                         "[batch, classes], an object or dict with 'logits', or a tuple whose first item is "
                         "the logits)", field="model.factory") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[0] != x.shape[0] \
            or not logits.dtype.is_floating_point:
        what = (f"a {logits.dtype} tensor of shape {_shape(logits.shape)}" if isinstance(logits, torch.Tensor)
                else type(logits).__name__)
        raise InputError(f"the logits of {spec!r} for a batch of {x.shape[0]} are {what}; compress needs a "
                         f"floating-point tensor [batch, classes, ...]", field="model.factory")
    return logits


def probe_model(model_cfg: ModelConfig, checkpoint: bool = True) -> ModelProbe:
    """Checks 1-2: build the model (and load ``model.checkpoint``) and run one example through it,
    without touching the global random state."""
    shape = tuple(model_cfg.input_shape) if model_cfg.input_shape is not None else None
    if shape is not None:
        require_memory(4 * int(np.prod(shape, dtype=np.float64)), f"one input of shape {_shape(shape)}",
                       "model.input_shape")
    with isolated_rng():
        model = build_with_checkpoint(model_cfg.factory, model_cfg.kwargs,
                                      model_cfg.checkpoint if checkpoint else None)
        if shape is None:  # dict / tuple inputs: check_fit runs a real batch instead
            return ModelProbe(model.eval(), None, None)
        try:
            x = example_input(model, shape, 1, seed=0)  # token ids for a token-id model
        except (RuntimeError, MemoryError) as exc:
            raise factory_failure(exc, model_cfg.factory, "model.input_shape",
                                  doing=f"allocating an input of shape {_shape(shape)}") from None
        logits = run_example(model, x, model_cfg.factory)
    model.eval()
    return ModelProbe(model, shape, tuple(logits.shape))


def _classes_field(model_cfg: ModelConfig) -> str:
    return "model.kwargs.num_classes" if "num_classes" in model_cfg.kwargs else "model.factory"


def check_declared_classes(probe: ModelProbe, model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
    """Check 3: the model is wide enough for the classes a built-in dataset is known to have."""
    n = declared_num_classes(data_cfg)
    if n is not None and probe.num_outputs is not None and probe.num_outputs < n:
        raise InputError(f"the model has {probe.num_outputs} outputs but data.dataset {data_cfg.dataset!r} has "
                         f"{n} classes (labels 0..{n - 1}); set model.kwargs.num_classes: {n}",
                         field=_classes_field(model_cfg))


def check_fit(probe: ModelProbe, data: DataBundle, model_cfg: ModelConfig, data_cfg: DataConfig,
              objective=None, seed: int = 0) -> None:
    """Check 5: the data fits the model: the samples' shape, every label inside the model's outputs
    (before any training), and the task's loss on one real training item."""
    objective = objective or build_objective(None)
    shape = data.input_shape
    if shape is not None and probe.input_shape is not None and tuple(shape) != probe.input_shape:
        raise InputError(f"is {_shape(probe.input_shape)} but the samples of data.dataset {data_cfg.dataset!r} "
                         f"have shape {_shape(shape)}", field="model.input_shape")
    x, y = default_collate([data.train[0]])  # one real item, batch 1
    with isolated_rng():
        param = next(probe.model.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
        try:
            with torch.no_grad():
                out = call_model(probe.model.eval(), to_device(x, dev))
        except Exception as exc:
            raise factory_failure(exc, model_cfg.factory, "model.input_shape",
                                  doing="running a batch of the training data") from None
    if probe.logits_shape is None:  # no model.input_shape: the real item is the probe
        try:
            probe.logits_shape = tuple(logits_of(out).shape)
        except TypeError as exc:
            raise InputError(f"compress cannot read logits from the output of {model_cfg.factory!r}: {exc}",
                             field="model.factory") from None
    ignore = getattr(objective, "ignore_index", None)
    if objective.name != "custom":  # a custom task's targets mean whatever its loss says
        _check_labels(probe, data, model_cfg, data_cfg, ignore, seed)
    try:
        with torch.no_grad(), isolated_rng():
            objective.loss(out, y.to(dev))
    except Exception as exc:
        shape = _shape(logits_of(out).shape) if not isinstance(exc, TypeError) else type(out).__name__
        raise InputError(f"the outputs of {model_cfg.factory!r} ({shape}) cannot be scored against the labels "
                         f"of data.dataset {data_cfg.dataset!r} (shape {_shape(y.shape)}) by the "
                         f"{objective.name} loss: {first_line(exc)}", field="model.factory") from None


def _check_labels(probe: ModelProbe, data: DataBundle, model_cfg: ModelConfig, data_cfg: DataConfig,
                  ignore: int | None, seed: int) -> None:
    """Every label (or a bounded sample of them, see :func:`compress.data.label_bounds`) inside the
    dataset's declared classes and the model's outputs: exit 2 before any training."""
    bounds = [label_bounds(ds, seed, ignore) for ds in (data.train, data.test)]
    lo = min(b[0] for b in bounds if b[2]) if any(b[2] for b in bounds) else 0
    hi = max(b[1] for b in bounds)
    how = "all labels" if all(b[3] for b in bounds) else "a sample of the labels"
    if data.num_classes and hi >= data.num_classes:
        raise InputError(f"labels range over {lo}..{hi} but num_classes is {data.num_classes} "
                         f"(labels must be 0..{data.num_classes - 1})", field="data.dataset")
    if lo < 0:
        raise InputError(f"{how} of data.dataset {data_cfg.dataset!r} include {lo}; labels must be 0 or more"
                         + (f" (or {ignore}, ignored)" if ignore is not None else ""), field="data.dataset")
    n = max(data.num_classes or 0, hi + 1)
    if probe.num_outputs < n:
        raise InputError(f"the model has {probe.num_outputs} outputs but data.dataset {data_cfg.dataset!r} has "
                         f"{n} classes ({how}: 0..{hi}); set model.kwargs.num_classes: {n}",
                         field=_classes_field(model_cfg))


@dataclass
class Preflight:
    """What the checks found: the data (for the runner) and a one-line description."""

    data: DataBundle | None
    params: int
    input_shape: tuple[int, ...] | None
    logits_shape: tuple[int, ...] | None
    data_note: str

    def describe(self) -> str:
        shown = _shape((1, *self.input_shape)) if self.input_shape else "a real batch"
        return (f"model builds ({self.params:,} params), input {shown} -> logits "
                f"{_shape(self.logits_shape) if self.logits_shape else 'not run'}; {self.data_note}")


def preflight(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, download: bool = True,
              checkpoint: bool = True, task=None) -> Preflight:
    """Every check above. With ``download=False`` (``validate``), data that is missing but would be
    downloaded by ``run`` is not fetched, and the data checks are skipped with a note."""
    probe = probe_model(model_cfg, checkpoint=checkpoint)
    check_declared_classes(probe, model_cfg, data_cfg)
    cfg = data_cfg if download or not data_cfg.download else data_cfg.model_copy(update={"download": False})
    try:
        data = build_data(cfg, probe.input_shape, seed)
    except MissingData:
        if download or not data_cfg.download:
            raise
        data = None
    if data is None:
        note = f"data {data_cfg.dataset}: not checked (files missing; run downloads them)"
    else:
        check_fit(probe, data, model_cfg, data_cfg, build_objective(task), seed)
        note = (f"data {data_cfg.dataset}: {len(data.train):,} train / {len(data.test):,} test samples"
                + (f", {data.num_classes} classes" if data.num_classes else ""))
    return Preflight(data, count_params(probe.model), probe.input_shape, probe.logits_shape, note)
