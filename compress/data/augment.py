"""``data.augment``: random changes to training items (never evaluation, calibration or export).

Each op works on one preprocessed ``[C, H, W]`` image and, for segmentation, its ``[H, W]`` label map
(geometric ops move both; erasing touches only the image). torchvision.transforms.v2 runs them when
importable; otherwise the small tensor versions below do, so the core install needs no torchvision.
They are written here rather than borrowed because the fallback's whole point is to need nothing
beyond torch; they follow torchvision's definitions (area scale, log-uniform aspect 3/4..4/3,
10 tries then the centre) so both backends mean the same thing.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.nn import functional as F

from ..errors import InputError

RATIO = (3 / 4, 4 / 3)


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))


def _coin(p: float) -> bool:
    return p > 0 and float(torch.rand(())) < p


def _resize(t: torch.Tensor, size, nearest: bool) -> torch.Tensor:
    if nearest:
        return F.interpolate(t[None, None].float(), size=size, mode="nearest")[0, 0].to(t.dtype)
    return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def resized_crop_box(h: int, w: int, scale) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area (torchvision's rule)."""
    area = h * w
    log_r = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1])
        ratio = math.exp(_uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            return top, left, ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


class BuiltinAugment:
    """The fallback backend: plain tensor ops, torch's global generator."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, x, y):
        c = self.cfg
        mask = y if isinstance(y, torch.Tensor) and y.dim() >= 2 else None
        h, w = x.shape[-2:]
        if c.random_resized_crop:
            top, left, ch, cw = resized_crop_box(h, w, c.random_resized_crop)
            x = _resize(x[:, top: top + ch, left: left + cw], (h, w), nearest=False)
            if mask is not None:
                mask = _resize(mask[top: top + ch, left: left + cw], (h, w), nearest=True)
        if c.random_crop_padding:
            pad = c.random_crop_padding
            top, left = int(torch.randint(0, 2 * pad + 1, ())), int(torch.randint(0, 2 * pad + 1, ()))
            x = F.pad(x, (pad, pad, pad, pad))[:, top: top + h, left: left + w]
            if mask is not None:
                mask = F.pad(mask, (pad, pad, pad, pad), value=0)[top: top + h, left: left + w]
        if _coin(c.horizontal_flip):
            x = x.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        if _coin(c.vertical_flip):
            x = x.flip(-2)
            mask = mask.flip(-2) if mask is not None else None
        if _coin(c.random_erasing):
            top, left, eh, ew = resized_crop_box(h, w, (0.02, 0.33))
            x = x.clone()
            x[:, top: top + eh, left: left + ew] = 0
        return x, (mask if mask is not None else y)


class TorchvisionAugment:
    """torchvision.transforms.v2, built on the first item (the crop size is the item's size)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._pipe = None

    def _build(self, h: int, w: int):
        from torchvision.transforms import v2

        c = self.cfg
        ops = []
        if c.random_resized_crop:
            ops.append(v2.RandomResizedCrop((h, w), scale=tuple(c.random_resized_crop), antialias=True))
        if c.random_crop_padding:
            ops.append(v2.RandomCrop((h, w), padding=c.random_crop_padding))
        if c.horizontal_flip:
            ops.append(v2.RandomHorizontalFlip(c.horizontal_flip))
        if c.vertical_flip:
            ops.append(v2.RandomVerticalFlip(c.vertical_flip))
        return v2.Compose(ops)

    def __call__(self, x, y):
        from torchvision import tv_tensors

        if self._pipe is None:
            self._pipe = self._build(*x.shape[-2:])
        if isinstance(y, torch.Tensor) and y.dim() >= 2:
            x, y = self._pipe(tv_tensors.Image(x), tv_tensors.Mask(y))
            x, y = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
        else:
            x = self._pipe(tv_tensors.Image(x)).as_subclass(torch.Tensor)
        if _coin(self.cfg.random_erasing):  # the image only, never the label map
            h, w = x.shape[-2:]
            top, left, eh, ew = resized_crop_box(h, w, (0.02, 0.33))
            x = x.clone()
            x[:, top: top + eh, left: left + ew] = 0
        return x, y


def torchvision_available() -> bool:
    try:
        from torchvision.transforms import v2  # noqa: F401
        from torchvision import tv_tensors  # noqa: F401
    except Exception:  # not installed, or a build that does not load on this machine
        return False
    return True


class _TensorInputsOnly:
    """Augmentation is defined for image tensors: refuse dict/tuple inputs with a clear message."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x, y):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            what = type(x).__name__ if not isinstance(x, torch.Tensor) else f"a tensor of shape {list(x.shape)}"
            raise InputError(f"augmentation needs [channels, height, width] image inputs, got {what}",
                             field="data.augment")
        return self.fn(x, y)


def build_augment(cfg) -> tuple[Callable | None, str | None]:
    """``(fn, backend name)`` for ``data.augment``; ``(None, None)`` when nothing is asked for."""
    if not cfg.active():
        return None, None
    use_tv = cfg.backend == "torchvision" or (cfg.backend == "auto" and torchvision_available())
    if cfg.backend == "torchvision" and not torchvision_available():
        raise InputError("torchvision is not importable here (pip install torchvision, or backend: builtin)",
                         field="data.augment.backend")
    if use_tv:
        return _TensorInputsOnly(TorchvisionAugment(cfg)), "torchvision.transforms.v2"
    return _TensorInputsOnly(BuiltinAugment(cfg)), "builtin"
