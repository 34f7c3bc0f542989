"""Data plumbing shared by every dataset: the bundle type, the registry, loaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import InputError
from ..registry import import_callable
from .config import DataConfig
from .registry import DATASETS


@dataclass
class DataBundle:
    """Train/test tensors. ``val`` is carved from train when a stage asks for a validation split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def split_validation(self, n_val: int, seed: int) -> tuple["DataBundle", tuple[torch.Tensor, torch.Tensor]]:
        """Hold out ``n_val`` training examples (fixed by ``seed``) as a validation split."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self.train_x), generator=g)
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        rest = DataBundle(self.train_x[tr_idx], self.train_y[tr_idx], self.test_x, self.test_y, self.num_classes)
        return rest, (self.train_x[val_idx], self.train_y[val_idx])


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A deterministic loader over in-memory tensors: the shuffle order depends only on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g,
                      drop_last=drop_last and len(x) > batch_size)


def build_data(cfg: DataConfig, input_shape: tuple[int, ...] | None, seed: int) -> DataBundle:
    """Load the dataset a recipe names, then apply the recipe's subset limits."""
    if ":" in cfg.dataset:
        fn = import_callable(cfg.dataset, field="data.dataset")
        try:
            bundle = fn(cfg, input_shape=input_shape, seed=seed)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"dataset callable failed: {exc}", field="data.dataset") from None
        if not isinstance(bundle, DataBundle):
            raise InputError("dataset callable must return compress.data.DataBundle", field="data.dataset")
    else:
        bundle = DATASETS.get(cfg.dataset, field="data.dataset")(cfg, input_shape=input_shape, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if cfg.limit_train and cfg.limit_train < len(bundle.train_x):
        idx = torch.randperm(len(bundle.train_x), generator=g)[: cfg.limit_train]
        bundle.train_x, bundle.train_y = bundle.train_x[idx], bundle.train_y[idx]
    if cfg.limit_test and cfg.limit_test < len(bundle.test_x):
        idx = torch.randperm(len(bundle.test_x), generator=g)[: cfg.limit_test]
        bundle.test_x, bundle.test_y = bundle.test_x[idx], bundle.test_y[idx]
    return bundle
