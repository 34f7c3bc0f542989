"""The input contract: how raw pixels become the tensor a model sees (``data.preprocess``).

Every split goes through the same :class:`Preprocess` (resize, centre crop, scale to [0, 1],
normalise with a declared mean/std). There are no hidden statistics: the mean and std are the
dataset's published defaults, the recipe's values, or (``mean: auto``) computed once from a bounded,
seeded sample of the training split; :meth:`Preprocess.contract` says which, and the runner writes
it to the run directory, ``summary.json``, ``report.md`` and ``model.onnx``'s metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.nn import functional as F

from ..errors import InputError

# Published per-dataset defaults: (scale of the stored pixels, mean, std). ``scale`` is what raw
# pixels are divided by to reach [0, 1] (255 for 8-bit images, 16 for scikit-learn's digits).
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"scale": 16.0, "mean": [0.5], "std": [0.5]},
    "digit_scenes": {"scale": 16.0, "mean": [0.5], "std": [0.5]},
    "mnist": {"scale": 255.0, "mean": [0.1307], "std": [0.3081]},
    "fashion_mnist": {"scale": 255.0, "mean": [0.2860], "std": [0.3530]},
    "cifar10": {"scale": 255.0, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
    # image folders and HF image datasets: pixels / 255 and nothing else unless the recipe says so
    "imagefolder": {"scale": 255.0, "mean": None, "std": None},
    "hf_disk": {"scale": 255.0, "mean": None, "std": None},
}

_PIL_FILTERS = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


def _pair(v) -> Optional[tuple[int, int]]:
    if v is None:
        return None
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class Preprocess:
    """Resize -> centre crop -> /scale -> (x - mean) / std, for PIL images or ``[C, H, W]`` tensors.

    ``resize`` int: the shorter side becomes N (aspect kept, as torchvision does); [h, w]: exactly
    that size. Masks (segmentation labels) follow the same geometry with nearest-neighbour."""

    scale: float = 255.0
    resize: Any = None
    crop: Any = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    interpolation: str = "bilinear"
    source: str = "dataset default"
    notes: dict[str, Any] = field(default_factory=dict)

    def _mean_std(self, channels: int):
        if self.mean is None:
            return None
        if len(self.mean) not in (1, channels):
            raise InputError(f"mean has {len(self.mean)} values but the images have {channels} channels",
                             field="data.preprocess.mean")
        m = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return m, s

    def _target_size(self, h: int, w: int) -> tuple[int, int] | None:
        if self.resize is None:
            return None
        if isinstance(self.resize, int):
            short = self.resize
            return (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
        return _pair(self.resize)

    def geometry_tensor(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Resize and crop a ``[C, H, W]`` tensor (``mode='nearest'`` for masks)."""
        mode = mode or self.interpolation
        size = self._target_size(x.shape[-2], x.shape[-1])
        if size is not None and tuple(x.shape[-2:]) != size:
            dtype = x.dtype
            y = x.float().unsqueeze(0) if x.dim() == 3 else x.float()[None, None]
            kw = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
            y = F.interpolate(y, size=size, mode=mode, **kw)
            x = (y[0] if x.dim() == 3 else y[0, 0]).round().to(dtype) if not dtype.is_floating_point else \
                (y[0] if x.dim() == 3 else y[0, 0])
        crop = _pair(self.crop)
        if crop is not None:
            h, w = x.shape[-2:]
            if crop[0] > h or crop[1] > w:
                raise InputError(f"crop {list(crop)} is larger than the image ({h}x{w} after resize)",
                                 field="data.preprocess.crop")
            top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
            x = x[..., top: top + crop[0], left: left + crop[1]]
        return x

    def geometry_pil(self, im):
        """Resize and crop a PIL image (decode once, at the size the model needs)."""
        size = self._target_size(im.size[1], im.size[0])
        if size is not None and (im.size[1], im.size[0]) != size:
            im = im.resize((size[1], size[0]), _PIL_FILTERS[self.interpolation])
        crop = _pair(self.crop)
        if crop is not None:
            w, h = im.size
            if crop[0] > h or crop[1] > w:
                raise InputError(f"crop {list(crop)} is larger than the image ({h}x{w} after resize)",
                                 field="data.preprocess.crop")
            top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
            im = im.crop((left, top, left + crop[1], top + crop[0]))
        return im

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``[C, H, W]`` raw pixels (any dtype) -> float32 model input."""
        x = x.to(torch.float32) / self.scale
        ms = self._mean_std(x.shape[0])
        if ms is not None:
            x = (x - ms[0]) / ms[1]
        return x

    def pil_to_tensor(self, im) -> torch.Tensor:
        """A decoded PIL image -> ``[C, H, W]`` uint8 tensor after the geometry."""
        import numpy as np

        arr = np.asarray(self.geometry_pil(im), dtype=np.uint8)
        t = torch.from_numpy(arr.copy())
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()

    def __call__(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = self.pil_to_tensor(x)
        else:
            x = self.geometry_tensor(x)
        return self.normalise(x)

    def contract(self) -> dict[str, Any]:
        """What ``summary.json``, ``report.md`` and the ONNX metadata record."""
        return {"pixel_scale": self.scale, "resize": self.resize, "crop": self.crop,
                "mean": self.mean, "std": self.std, "interpolation": self.interpolation,
                "formula": "((pixels / pixel_scale) - mean) / std, channels first (NCHW)"
                           + ("" if self.mean is not None else "; no mean/std: pixels / pixel_scale only"),
                "source": self.source, **self.notes}


def resolve(cfg, dataset: str, input_hw: Sequence[int] | None = None) -> Preprocess:
    """The :class:`Preprocess` for ``cfg`` (a DataConfig): the recipe's fields over the dataset's
    defaults. Image folders and HF images default to the model's input size (``input_hw``)."""
    base = DEFAULTS.get(dataset, {"scale": 1.0, "mean": None, "std": None})
    p = cfg.preprocess
    given = p.model_fields_set
    resize = p.resize if p.resize is not None else (list(input_hw) if input_hw and dataset in ("imagefolder", "hf_disk")
                                                    else None)
    mean = base["mean"] if "mean" not in given else p.mean
    std = base["std"] if "std" not in given else p.std
    if (mean is None) != (std is None):
        raise InputError("give mean and std together", field="data.preprocess")
    source = "recipe" if given & {"mean", "std"} else "dataset default"
    return Preprocess(scale=base["scale"], resize=resize, crop=p.crop, mean=mean, std=std,
                      interpolation=p.interpolation, source=source)


@torch.no_grad()
def auto_statistics(raw_items, channels_hint: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over an iterable of ``[C, H, W]`` tensors in [0, 1] (one pass:
    sums and sums of squares in float64, so a few hundred images need no more memory than one)."""
    s = sq = None
    n = 0
    for x in raw_items:
        x = x.to(torch.float64)
        flat = x.reshape(x.shape[0], -1)
        s = flat.sum(1) if s is None else s + flat.sum(1)
        sq = (flat * flat).sum(1) if sq is None else sq + (flat * flat).sum(1)
        n += flat.shape[1]
    if s is None or n == 0:
        raise InputError("mean: auto found no training images to compute statistics from", field="data.preprocess")
    mean = s / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-6)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
