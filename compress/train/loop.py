"""One training loop for dense training, fine-tuning, distillation and masked (sparse) training."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DivergedError
from ..sparsity import masks
from ..metrics import batch_size_of, call_model, evaluate, logits_of, to_device
from ..progress import task


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: int = 0
    history: list[dict] = field(default_factory=list)


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


def distill_loss(student_logits, teacher_logits, targets, alpha: float, temperature: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)."""
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                  reduction="batchmean", log_target=True) * (t * t)
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * kd + (1 - alpha) * ce


def train(model: nn.Module, loader, cfg, device: torch.device | str = "cpu", teacher: nn.Module | None = None,
          distill=None, description: str = "train", eval_fn: Callable[[nn.Module], dict] | None = None,
          on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
          start_step: int = 0, optimizer_state: dict | None = None, objective=None) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs (or ``cfg.max_steps`` steps).

    ``start_step`` / ``optimizer_state`` resume a run at step k (late rewinding): the LR schedule,
    the epoch count and the optimizer moments continue from there. A loader with ``set_epoch``
    gets the epoch number first, so its data order can depend only on the epoch.

    Masks (``*_mask`` buffers) are honoured: gradients are masked before and weights after every
    step, and optimizer state at masked positions is zeroed, so pruned weights stay exactly zero.

    Batches are ``(inputs, targets)``: ``inputs`` a tensor (``model(x)``), a tuple/list of tensors
    (``model(*x)``) or a dict of tensors (``model(**x)``). ``objective`` (see
    :class:`compress.tasks.Objective`: ``loss(out, targets)`` and ``distill_loss(student_out,
    teacher_out, targets, distill)`` on raw model outputs) replaces classification's cross-entropy
    and Hinton distillation.

    A NaN or infinite loss raises :class:`compress.errors.DivergedError` (exit 5) naming the step;
    the runner adds the stage.
    """
    model.to(device)
    opt = make_optimizer(model, cfg.optimizer)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a loaded state overwrites them
    if optimizer_state is not None:
        opt.load_state_dict(copy.deepcopy(optimizer_state))  # load_state_dict may alias the caller's tensors
    masks.mask_optimizer_state(opt, model)
    steps_per_epoch = max(1, len(loader))
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
    epochs = math.ceil(total / steps_per_epoch)
    first_epoch, skip = divmod(start_step, steps_per_epoch)
    with task(description, total - start_step) as bar:
        for epoch in range(first_epoch, epochs):
            model.train()
            loss_sum, seen = 0.0, 0
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch_index, (xb, yb) in enumerate(loader):
                if result.steps >= total:
                    break
                if epoch == first_epoch and batch_index < skip:
                    continue
                f = lr_factor(result.steps, total, warmup, cfg.optimizer)
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * f
                xb, yb = to_device(xb, device), yb.to(device)
                raw = call_model(model, xb)
                if teacher is not None and distill is not None:
                    with torch.no_grad():
                        t_raw = call_model(teacher, xb)
                    loss = (objective.distill_loss(raw, t_raw, yb, distill) if objective is not None else
                            distill_loss(logits_of(raw), logits_of(t_raw), yb, distill.alpha, distill.temperature,
                                         cfg.label_smoothing))
                else:
                    loss = (objective.loss(raw, yb) if objective is not None else
                            F.cross_entropy(logits_of(raw), yb, label_smoothing=cfg.label_smoothing))
                if not bool(torch.isfinite(loss)):  # stop at once: every later step would train on garbage
                    raise DivergedError(
                        f"{description}: the loss is {loss.item()} at step {result.steps + 1} (epoch {epoch + 1}, "
                        f"learning rate {opt.param_groups[0]['lr']:.3g}); lower the learning rate, add grad_clip, "
                        "or check the data and model.checkpoint")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if use_masks:
                    masks.mask_gradients(model)
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if use_masks:
                    masks.apply_masks(model)
                result.steps += 1
                loss_sum += loss.item() * batch_size_of(xb)
                seen += batch_size_of(xb)
                if on_step is not None:
                    on_step(result.steps, model, opt)
                bar.advance(1, info=f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
            record = {"epoch": epoch + 1, "steps": result.steps, "train_loss": loss_sum / max(1, seen)}
            if eval_fn is not None:
                record.update(eval_fn(model))
            result.history.append(record)
            result.epochs_run = epoch + 1
    model.eval()
    return result


__all__ = ["train", "make_optimizer", "lr_factor", "distill_loss", "evaluate", "TrainResult"]
