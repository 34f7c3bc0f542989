"""One training loop for dense training, fine-tuning, distillation and masked (sparse) training.

Options (:class:`compress.train.config.TrainLoopConfig`): autocast precision (bf16, fp16 with a
gradient scaler), channels_last, gradient accumulation, torch.compile, an EMA of the weights. Under
torchrun, inside a collective block (:mod:`compress.distributed`), the model trains as
DistributedDataParallel over a DistributedSampler. With a :class:`StepCheckpointing`, the whole
training state is written every few steps and a restarted loop continues from it.
"""
from __future__ import annotations

import copy
import io
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from .. import distributed as dist
from ..errors import DivergedError, InputError
from ..io import atomic_write_bytes
from ..metrics import call_model, evaluate, to_device
from ..progress import task
from ..sparsity import masks
from ..tasks.classification import Classification


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_at_step: int | None = None       # the step a step checkpoint was continued from
    samples_per_s: float | None = None       # over the whole run (all processes), last epoch's in history
    compile: str | None = None               # "on", or why torch.compile fell back to eager


@dataclass
class StepCheckpointing:
    """Where and how often the loop writes its state: every ``every`` optimizer steps (None: at the
    end of each epoch) and at least every ``max_seconds`` of training. Only rank 0 writes."""

    path: Path
    every: int | None = None
    max_seconds: float = 600.0


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW; no weight decay on biases and norm parameters (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: int, cfg) -> float:
    """Linear warm-up for ``warmup`` steps, then the schedule over the remaining steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        return cfg.step_gamma ** sum(t >= m for m in cfg.step_milestones)
    return 1.0


def _loss(out, teacher_out, targets, objective, distill) -> torch.Tensor:
    """The task's loss on raw model outputs, or its distillation loss when there is a teacher."""
    if teacher_out is not None:
        return objective.distill_loss(out, teacher_out, targets, distill)
    return objective.loss(out, targets)


# ---------------------------------------------------------------------------------------------
# Loaders: the distributed view, starting an epoch part-way

def _seed_of(loader: DataLoader) -> int:
    return int(loader.generator.initial_seed()) if loader.generator is not None else 0


def distributed_view(loader):
    """This rank's share of ``loader``: the same dataset, batch size and collate function read
    through a DistributedSampler (shuffled when the loader shuffles, seeded from its generator).
    A loader that already reads a DistributedSampler is returned as it is."""
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise RuntimeError(f"bug: data-parallel training needs a map-style DataLoader with a batch size, "
                           f"not {type(loader).__name__}")
    sampler = DistributedSampler(loader.dataset, num_replicas=dist.world_size(), rank=dist.rank(),
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=_seed_of(loader),
                                 drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                      **dist.loader_options(loader))


class _SkipBatches:
    """A batch sampler without its first ``skip`` batches: an epoch resumed part-way draws the same
    order (the same generator draws, in the same sequence) but loads none of the batches it
    already trained on."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip
        self.current: _SkippingIterator | None = None

    def __iter__(self):
        self.current = _SkippingIterator(iter(self.batch_sampler), self.skip)
        return self.current

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


class _SkippingIterator:
    def __init__(self, it, skip: int):
        self.it, self.skip = it, skip

    def drop_skipped(self) -> None:
        """Draw (and drop) the skipped batches' indices now: the DataLoader's iterator draws its
        worker seed first, then the order, as an uninterrupted epoch does; the caller then restores
        the random state of the step it resumes at."""
        while self.skip:
            self.skip -= 1
            next(self.it, None)

    def __iter__(self):
        return self

    def __next__(self):
        self.drop_skipped()
        return next(self.it)


def _epoch_batches(loader, skip: int):
    """An iterator over one epoch of ``loader`` from batch ``skip`` on."""
    if not skip:
        return iter(loader)
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None \
            and not isinstance(loader.dataset, IterableDataset):
        sampler = _SkipBatches(loader.batch_sampler, skip)
        it = iter(DataLoader(loader.dataset, batch_sampler=sampler, **dist.loader_options(loader)))
        sampler.current.drop_skipped()
        return it
    return itertools.islice(iter(loader), skip, None)  # another iterable: read and drop


# ---------------------------------------------------------------------------------------------
# Random state and step checkpoints (loadable with torch.load(weights_only=True))

def _rng_state(loader) -> dict:
    keys_name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        state["loader"] = gen.get_state()
    return state


def _set_rng_state(state: dict, loader, include_loader: bool = True) -> None:
    torch.set_rng_state(state["torch"].cpu())
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    gen = getattr(loader, "generator", None)
    if include_loader and "loader" in state and isinstance(gen, torch.Generator):
        gen.set_state(state["loader"].cpu())


def _note(msg: str) -> None:
    if dist.is_main():
        sys.stderr.write(f"note: {msg}\n")
        sys.stderr.flush()


def _load_step_checkpoint(ckpt: StepCheckpointing, description: str, total: int, device) -> dict | None:
    """The saved state of this training run, if a usable one exists (read by rank 0, sent to all)."""
    state = None
    if dist.is_main() and ckpt.path.is_file():
        try:
            state = torch.load(str(ckpt.path), map_location="cpu", weights_only=True)
        except Exception as exc:  # damaged or from another version: the stage starts over, saying why
            _note(f"{ckpt.path}: unreadable step checkpoint ({type(exc).__name__}); the stage starts over")
            state = None
        if state is not None and (state.get("total") != total or state.get("world_size") != dist.world_size()):
            _note(f"{ckpt.path}: the step checkpoint is for {state.get('total')} steps on "
                  f"{state.get('world_size')} process(es), this run has {total} on {dist.world_size()}; "
                  "the stage starts over")
            state = None
    if dist.training_is_distributed():
        state = dist.broadcast_object(state)
    return state


def _save_step_checkpoint(ckpt: StepCheckpointing, state: dict) -> None:
    if not dist.is_main():
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(ckpt.path, buf.getvalue())


# ---------------------------------------------------------------------------------------------

def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _eager_fallback(exc: Exception, result: TrainResult) -> None:
    why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:200]
    result.compile = f"failed, eager instead ({why})"
    if dist.is_main():
        print(f"warning: compile: torch.compile failed, training eagerly ({why})", file=sys.stderr)


def train(model: nn.Module, loader, cfg, device: torch.device | str = "cpu", teacher: nn.Module | None = None,
          distill=None, description: str = "train", eval_fn: Callable[[nn.Module], dict] | None = None,
          on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
          start_step: int = 0, optimizer_state: dict | None = None, objective=None,
          checkpointing: StepCheckpointing | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs (or ``cfg.max_steps`` optimizer steps).

    ``start_step`` / ``optimizer_state`` resume a run at step k (late rewinding): the LR schedule,
    the epoch count and the optimizer moments continue from there. A loader with ``set_epoch``
    gets the epoch number first, so its data order can depend only on the epoch.

    ``checkpointing``: the whole state (model, optimizer, step, scaler, EMA, every random generator,
    the loader's position) is written there every few steps; a run that finds one continues from it
    (``resumed_at_step``) and, single-process on CPU in fp32, ends bit for bit where an uninterrupted
    run ends. The caller deletes it once the stage is complete.

    Masks (``*_mask`` buffers) are honoured: gradients are masked before and weights after every
    step, and optimizer state at masked positions is zeroed, so pruned weights stay exactly zero.

    Batches are ``(inputs, targets)``: ``inputs`` a tensor (``model(x)``), a tuple/list of tensors
    (``model(*x)``) or a dict of tensors (``model(**x)``). ``objective`` (see
    :class:`compress.tasks.Objective`: ``loss(out, targets)`` and ``distill_loss(student_out,
    teacher_out, targets, distill)`` on raw model outputs) is the task trained for; None means
    classification (:class:`compress.tasks.Classification` with ``cfg.label_smoothing``: cross-entropy,
    Hinton distillation), the one implementation of each.

    A NaN or infinite loss raises :class:`compress.errors.DivergedError` (exit 5) naming the step;
    the runner adds the stage. A step the fp16 gradient scaler skips (overflowing gradients) is not
    divergence.
    """
    device = torch.device(device)
    precision = cfg.precision
    if objective is None:  # classification: cross-entropy with the loop's label smoothing, Hinton distillation
        objective = Classification(label_smoothing=cfg.label_smoothing)
    if precision == "fp16" and device.type != "cuda":
        raise InputError("fp16 autocast needs a CUDA device; use precision: bf16 on CPU", field="precision")
    distributed = dist.training_is_distributed()
    if distributed:
        loader = distributed_view(loader)
    accum = cfg.grad_accum_steps
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg.optimizer)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a loaded state overwrites them
    if optimizer_state is not None:
        opt.load_state_dict(copy.deepcopy(optimizer_state))  # load_state_dict may alias the caller's tensors
    masks.mask_optimizer_state(opt, model)
    batches_per_epoch = max(1, len(loader))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps) if cfg.epochs else cfg.max_steps
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if teacher is not None:
        teacher.to(device).eval()
    result = TrainResult(steps=start_step)
    use_masks = masks.has_masks(model)
    if total <= start_step:
        return result
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)

    first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
    skip = skip_steps * accum                # micro-batches of the first epoch already trained on
    loss_sum = seen = 0.0
    saved = _load_step_checkpoint(checkpointing, description, total, device) if checkpointing else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        result.steps = result.resumed_at_step = int(saved["steps"])
        result.history = list(saved["history"])
        result.epochs_run = len(result.history)
        first_epoch, skip = int(saved["epoch"]), int(saved["batch"])
        loss_sum, seen = float(saved["loss_sum"]), float(saved["seen"])
        _note(f"{description}: continuing from the step checkpoint at step {result.steps} of {total}")

    runner: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    epochs = math.ceil(total / steps_per_epoch)
    last_checkpoint = time.monotonic()
    samples_total, seconds_total = 0.0, 0.0

    def checkpoint_state(epoch: int, batch: int, epoch_rng: dict, losses: float, count: float) -> dict:
        return {"format": 1, "description": description, "total": total, "world_size": dist.world_size(),
                "steps": result.steps, "epoch": epoch, "batch": batch, "loss_sum": losses, "seen": count,
                "history": result.history, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "epoch_rng": epoch_rng, "step_rng": _rng_state(loader)}

    with task(description, total - result.steps) as bar:
        for epoch in range(first_epoch, epochs):
            if result.steps >= total:
                break
            model.train()
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            if isinstance(getattr(loader, "sampler", None), DistributedSampler):
                loader.sampler.set_epoch(epoch)
            if saved is not None and epoch == first_epoch:
                _set_rng_state(saved["epoch_rng"], loader)   # the epoch's order, as drawn when it began
                epoch_rng = saved["epoch_rng"]
                batches = _epoch_batches(loader, skip)
                if skip:  # then the global generators as they were at the saved step (the loader's
                    # own generator has drawn this epoch's order: it stays as it is now)
                    _set_rng_state(saved["step_rng"], loader, include_loader=False)
            else:
                epoch_rng = _rng_state(loader) if checkpointing else {}
                batches = _epoch_batches(loader, skip if epoch == first_epoch else 0)
            position = skip if epoch == first_epoch else 0   # micro-batches of this epoch consumed
            epoch_samples, t_epoch = 0.0, time.perf_counter()
            pending = 0                                       # micro-batches accumulated into .grad
            group = accum
            for xb, yb in batches:
                if result.steps >= total:
                    break
                if pending == 0:  # a new optimizer step: its micro-batch count (fewer at the epoch's end)
                    group = max(1, min(accum, batches_per_epoch - position))
                    f = lr_factor(result.steps, total, warmup, cfg.optimizer)
                    for g, lr in zip(opt.param_groups, base_lrs):
                        g["lr"] = lr * f
                    opt.zero_grad(set_to_none=True)
                inputs, yb = to_device(xb, device, cfg.channels_last), to_device(yb, device)
                if cfg.compile and result.compile is None:
                    eager = runner
                    runner = torch.compile(runner)
                final_micro = pending + 1 >= group
                sync = runner.no_sync() if distributed and not final_micro else _nullcontext()
                with sync:
                    with _autocast(device, precision):
                        if cfg.compile and result.compile is None:  # compiling happens at the first call
                            try:
                                out = call_model(runner, inputs)
                                result.compile = "on"
                            except Exception as exc:  # no C++ compiler, an op dynamo cannot trace: train eagerly
                                _eager_fallback(exc, result)
                                runner = eager
                                out = call_model(runner, inputs)
                        else:
                            out = call_model(runner, inputs)
                        t_out = None
                        if teacher is not None and distill is not None:
                            with torch.no_grad():
                                t_out = call_model(teacher, inputs)
                        loss = _loss(out, t_out, yb, objective, distill)
                    finite = bool(torch.isfinite(loss))
                    if dist.any_rank(not finite, device):  # stop at once (all ranks): later steps would train on garbage
                        value = loss.item() if not finite else "not finite on another process"
                        raise DivergedError(
                            f"{description}: the loss is {value} at step {result.steps + 1} (epoch {epoch + 1}, "
                            f"learning rate {opt.param_groups[0]['lr']:.3g}, precision {precision}); lower the "
                            "learning rate, add grad_clip, or check the data and model.checkpoint")
                    scaler.scale(loss / group).backward()
                n = len(yb)
                loss_sum += loss.item() * n
                seen += n
                epoch_samples += n
                position += 1
                pending += 1
                if not final_micro:
                    continue
                pending = 0
                if use_masks:
                    masks.mask_gradients(model)
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)  # skips the step when fp16 gradients overflowed (not divergence)
                scaler.update()
                if use_masks:
                    masks.apply_masks(model)
                if ema is not None:
                    ema.update_parameters(model)
                result.steps += 1
                if on_step is not None:
                    on_step(result.steps, model, opt)
                bar.advance(1, info=f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
                if checkpointing and result.steps < total and position < batches_per_epoch and (
                        (checkpointing.every and result.steps % checkpointing.every == 0)
                        or time.monotonic() - last_checkpoint >= checkpointing.max_seconds):
                    _save_step_checkpoint(checkpointing, checkpoint_state(epoch, position, epoch_rng, loss_sum, seen))
                    last_checkpoint = time.monotonic()
            seconds = time.perf_counter() - t_epoch
            loss_total, count, samples = dist.all_reduce_sum([loss_sum, seen, epoch_samples], device)
            samples_total += samples
            seconds_total += seconds
            record = {"epoch": epoch + 1, "steps": result.steps, "train_loss": loss_total / max(1.0, count),
                      "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None}
            if eval_fn is not None:
                record.update(eval_fn(ema.module if ema is not None else model))
            result.history.append(record)
            result.epochs_run = epoch + 1
            loss_sum = seen = 0.0
            if checkpointing and result.steps < total and (
                    not checkpointing.every or result.steps % checkpointing.every == 0
                    or time.monotonic() - last_checkpoint >= checkpointing.max_seconds):
                _save_step_checkpoint(checkpointing, checkpoint_state(epoch + 1, 0, _rng_state(loader), 0.0, 0.0))
                last_checkpoint = time.monotonic()
    if ema is not None:  # the average is the result: evaluated and saved
        model.load_state_dict(ema.module.state_dict())
        if use_masks:
            masks.apply_masks(model)
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    result.samples_per_s = round(samples_total / seconds_total, 1) if seconds_total > 0 else None
    model.eval()
    return result


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


__all__ = ["train", "make_optimizer", "lr_factor", "evaluate", "TrainResult", "StepCheckpointing",
           "to_device", "call_model", "distributed_view"]
