"""``sparsify``: N:M (2:4) semi-structured weight masks along the reduction (input-channel) dim,
the layout TensorRT's sparse tensor-core kernels read. ``pattern: "N:M"`` keeps at most N non-zero
weights in every M consecutive input channels (``2:4``: 2 of 4; ``1:4``: 1 of 4; ``4:8``: 4 of 8),
the convention of :mod:`compress.sparsity.n_m`. Masks stay fixed through later fine-tunes."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator
from torch import nn

from .base import StageConfig
from ..sparsity import masks
from ..sparsity.n_m import n_m_mask, parse_pattern
from ..modules import match_any, output_layer
from ..sparsity.sparsegpt import sparsegpt_masks
from .artifacts import MASKS
from .base import StageOutput, register_stage

SPARSIFY_METHODS = ("magnitude", "sparsegpt")


class Config(StageConfig):
    kind: Literal["sparsify"] = "sparsify"
    changes_structure: ClassVar[bool] = True
    every_rank: ClassVar[bool] = True
    pattern: str = Field("2:4", description="N:M: at most N non-zeros in every M consecutive input channels")
    method: str = "magnitude"
    ignore: Optional[list[str]] = Field(None, description="module-name patterns left dense; default: none")
    asp_rule: bool = Field(False, description="only layers with out % 8 == 0 and in % 16 == 0 (NVIDIA ASP)")
    calibration_batches: int = Field(8, ge=1, description="training-split batches for sparsegpt's Hessians")
    block_size: int = Field(128, ge=4, description="sparsegpt: columns per lazy-update block")
    damp: float = Field(0.01, gt=0, le=1, description="sparsegpt: Hessian dampening, fraction of mean diagonal")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parse_pattern(v)  # ValueError: one line naming the rule
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in SPARSIFY_METHODS:
            raise ValueError(f"unknown method {v!r} (known: {', '.join(SPARSIFY_METHODS)})")
        return v

    def provides(self) -> set[str]:
        return {MASKS}

    @property
    def n_m(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)


def eligible_layers(model: nn.Module, m: int, ignore, asp_rule: bool) -> tuple[list[tuple[str, nn.Module]], list[dict]]:
    """Layers whose reduction dim can hold the pattern; the others, with the reason they were skipped."""
    take, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        if ignore and match_any(name, ignore):
            skipped.append({"layer": name, "reason": "ignored by recipe"})
            continue
        if isinstance(mod, nn.Conv2d):
            cin, cout = mod.in_channels // mod.groups, mod.out_channels
            if mod.groups > 1 and cin == 1:
                skipped.append({"layer": name, "reason": "depthwise conv"})
                continue
        else:
            cin, cout = mod.in_features, mod.out_features
        if cin % m:
            skipped.append({"layer": name, "reason": f"input channels {cin} not a multiple of {m}"})
            continue
        if asp_rule and (cout % 8 or cin % 16):
            skipped.append({"layer": name, "reason": f"ASP rule (out % 8, in % 16) fails for {cout}x{cin}"})
            continue
        take.append((name, mod))
    return take, skipped


@register_stage("sparsify", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Attach N:M masks to every eligible Conv/Linear weight."""
    n, m = cfg.n_m
    ignore = cfg.ignore
    layers, skipped = eligible_layers(ctx.model, m, ignore, cfg.asp_rule)
    if cfg.method == "sparsegpt":
        batches = ctx.calibration_batches(cfg.calibration_batches)
        found = sparsegpt_masks(ctx.model, dict(layers), batches, n, m, block=cfg.block_size, damp=cfg.damp,
                                device=ctx.device)
        for name, mod in layers:
            masks.set_mask(mod, found[name])
    else:
        for name, mod in layers:
            masks.set_mask(mod, n_m_mask(mod.weight, n, m))
    total = sum(mod.weight.numel() for _, mod in layers)
    zeros = sum(int((mod.weight == 0).sum()) for _, mod in layers)
    primary, acc = next(iter(ctx.headline().items()))
    return StageOutput(metrics={
        "pattern": cfg.pattern, "method": cfg.method, "layers_sparsified": [nm for nm, _ in layers],
        "layers_skipped": skipped, "sparsity_in_sparsified_layers": zeros / max(1, total),
        f"{primary}_after_sparsify": acc, "classifier": output_layer(ctx.model),
    })
