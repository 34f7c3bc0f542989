"""Early-Bird tickets (You et al. 2020): channel masks from BatchNorm |γ| (one global ranking,
``ratio`` of the channels pruned) drawn every epoch; the ticket has emerged once the normalised
Hamming distance between the newest mask and each of the previous ``window - 1`` stays below
``threshold`` (paper: window 5, threshold 0.1). Training can then stop and the structured pruning
path prune those channels instead of waiting for a fully trained model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..train.loop import train


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def channel_mask(model: nn.Module, ratio: float) -> torch.Tensor:
    """1 for the channels kept: the top ``1 - ratio`` of |γ| over all BN layers (ties: lower index)."""
    gammas = torch.cat([m.weight.detach().abs().flatten().cpu() for _, m in bn_layers(model)])
    if gammas.numel() == 0:
        raise ValueError("Early-Bird needs BatchNorm layers (their γ rank the channels)")
    keep = int(round(gammas.numel() * (1 - ratio)))
    order = torch.sort(gammas, descending=True, stable=True).indices[:keep]
    mask = torch.zeros_like(gammas)
    mask[order] = 1.0
    return mask


def split_mask(model: nn.Module, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The global channel mask as ``{bn layer name: per-channel 0/1}``."""
    out, i = {}, 0
    for name, m in bn_layers(model):
        out[name] = mask[i: i + m.num_features]
        i += m.num_features
    return out


@dataclass
class EarlyBird:
    ratio: float
    window: int = 5
    threshold: float = 0.1
    masks: list[torch.Tensor] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)   # max distance to the previous masks, per epoch
    found_at: int | None = None                             # 1-based epoch the ticket emerged

    def update(self, model: nn.Module) -> bool:
        """Draw this epoch's mask; True once the ticket has emerged."""
        mask = channel_mask(model, self.ratio)
        self.masks = (self.masks + [mask])[-self.window:]
        epoch = len(self.distances) + 1
        if len(self.masks) < self.window:
            self.distances.append(float("nan"))
            return False
        d = max(float((mask != m).float().mean()) for m in self.masks[:-1])
        self.distances.append(d)
        if d < self.threshold and self.found_at is None:
            self.found_at = epoch
        return self.found_at is not None


class _Found(Exception):
    pass


def train_until_early_bird(model: nn.Module, loader, cfg, detector: EarlyBird, device="cpu") -> EarlyBird:
    """Train (``cfg`` as for :func:`train`) and stop at the end of the epoch the ticket emerges."""
    def per_epoch(m: nn.Module) -> dict:
        if detector.update(m):
            raise _Found  # stop training: the rest is what Early-Bird saves
        return {"early_bird_distance": detector.distances[-1]}

    try:
        train(model, loader, cfg, device, description="early-bird", eval_fn=per_epoch)
    except _Found:
        model.eval()
    return detector
