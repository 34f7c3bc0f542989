"""Your own data in compress: a ``data.dataset: "module:callable"`` that returns torch Datasets.

The callable is called as ``fn(cfg, seed=seed)``: ``cfg`` is the recipe's ``data`` block (so your
callable can read ``cfg.root``, ``cfg.batch_size``...), ``seed`` the recipe's seed. It returns a dict:

    {"train": Dataset, "test": Dataset, "val": Dataset or None (optional), "num_classes": int (optional)}

Each Dataset is map-style (``__len__`` and ``__getitem__``) and yields ``(inputs, target)`` pairs:
``inputs`` a float tensor (one sample, no batch dimension), a tuple of tensors (``model(*inputs)``) or
a dict of tensors (``model(**inputs)``); ``target`` a class index (classification) or an ``[H, W]``
label map (segmentation). Your Datasets do their own preprocessing: compress applies none to them
and records that in the report and in model.onnx's metadata.

Run it (from the repository root, so ``examples`` is importable):

    python3 -m compress run examples/my_dataset.yaml --out /tmp/my_dataset
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Stripes(Dataset):
    """Tiny 1x8x8 images: class k has a bright row at k (k = 0..3) plus noise; generated per item
    from (seed, index), so nothing is held in memory and every epoch sees the same samples."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % 4
        x = 0.3 * torch.randn(1, 8, 8, generator=g)
        x[0, 2 * label] += 1.0
        return x, label


def make(cfg, *, seed: int) -> dict:
    return {"train": Stripes(512, seed), "test": Stripes(128, seed + 1), "val": None, "num_classes": 4}
