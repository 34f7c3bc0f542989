"""Per-step cost of the mask mechanism in a plain user training loop.

Three variants of the same model, trained with the same plain loop (forward, ``loss.backward()``,
``opt.step()``; nothing compress-specific in the loop):

- ``dense``: no masks (the floor);
- ``hooks``: 2:4 masks as compress sets them (``*_mask`` buffers + the forward pre-hook and gradient
  hook of :mod:`compress.sparsity.masks`), which is what ``compress.load`` returns;
- ``parametrize``: the same masks through ``torch.nn.utils.parametrize`` (``weight = original * mask``),
  the alternative the mechanism was chosen against, for reference.

Variants are interleaved (one block of steps each, order rotated every round) and the median
per-step time over rounds is reported, so load on a shared machine hits all three alike.

    python -m benchmarks.mask_overhead [--model small_cnn|resnet20] [--batch 64] [--rounds 15] [--steps 10]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from benchmarks.common import machine, machine_lines, write_results
from compress.model_io import build_model
from compress.sparsity import masks
from compress.sparsity.n_m import n_m_mask
from compress.stages.sparsify import eligible_layers

MODELS = {"small_cnn": ({"num_classes": 10, "in_channels": 3, "width": 32}, (3, 16, 16)),
          "resnet20": ({"num_classes": 10}, (3, 32, 32))}


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def variants(name: str) -> dict[str, nn.Module]:
    kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    dense = build_model(name, kwargs)
    layers, _ = eligible_layers(dense, 4, None, False)
    hooks = copy.deepcopy(dense)
    for lname, _ in layers:
        mod = hooks.get_submodule(lname)
        masks.set_mask(mod, n_m_mask(mod.weight, 2, 4))
    param = copy.deepcopy(dense)
    for lname, _ in layers:
        mod = param.get_submodule(lname)
        mask = n_m_mask(mod.weight, 2, 4)
        with torch.no_grad():
            mod.weight.mul_(mask)
        torch.nn.utils.parametrize.register_parametrization(mod, "weight", _Mask(mask))
    return {"dense": dense, "hooks": hooks, "parametrize": param}


def timed_steps(model: nn.Module, opt, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small_cnn", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, shape = MODELS[args.model]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    models = variants(args.model)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01) for k, m in models.items()}
    for k, m in models.items():  # warm-up
        m.train()
        timed_steps(m, opts[k], x, y, 3)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for r in range(args.rounds):
        for k in order[r % len(order):] + order[: r % len(order)]:
            times[k].append(timed_steps(models[k], opts[k], x, y, args.steps))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    held = all(bool((getattr(mod, p)[mask == 0] == 0).all()) for _, mod, p, mask in masks.iter_masks(models["hooks"]))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    m = machine()
    cmd = "python -m benchmarks.mask_overhead " + " ".join(sys.argv[1:])
    rows = "\n".join(f"| {k} | {med[k]:.2f} | {100 * (med[k] / med['dense'] - 1):+.1f} % |" for k in models)
    md = (f"# Mask mechanism: cost per training step\n\n"
          f"`{cmd.strip()}` — {args.model}, batch {args.batch}, AdamW, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds of {args.steps} steps; median ms per step.\n\n"
          f"| variant | ms / step | vs dense |\n|---|---:|---:|\n{rows}\n\n"
          f"Masked weights still exactly zero after all steps (hooks): {held}.\n\n"
          f"{machine_lines(m)}- note: a shared machine; other processes were running, the variants were "
          "interleaved so they share the load.\n")
    data = {"command": cmd.strip(), "model": args.model, "batch": args.batch, "rounds": args.rounds,
            "steps": args.steps, "threads": args.threads, "median_ms_per_step": med,
            "per_round_ms": {k: [t * 1000 for t in v] for k, v in times.items()}, "zeros_held": held, "machine": m}
    print(write_results("mask_overhead", md, data))
    print(md)


if __name__ == "__main__":
    main()
