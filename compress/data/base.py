"""Data plumbing shared by every dataset: the bundle type, the registry, loaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import EnvironmentFailure, InputError, first_line, is_out_of_memory
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


def check_bundle(bundle: DataBundle, field: str) -> None:
    """A bundle compress can train on: tensors, as many labels as samples, integer labels in
    ``0..num_classes-1``, non-empty splits. A violation is an input error naming ``field``."""
    for split in ("train", "test"):
        x, y = getattr(bundle, f"{split}_x"), getattr(bundle, f"{split}_y")
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise InputError(f"{split}_x and {split}_y must be torch tensors (got {type(x).__name__}, "
                             f"{type(y).__name__})", field=field)
        if len(x) == 0:
            raise InputError(f"the {split} split is empty", field=field)
        if len(x) != len(y):
            raise InputError(f"the {split} split has {len(x):,} samples but {len(y):,} labels", field=field)
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise InputError(f"{split}_y must hold integer class labels (got {y.dtype})", field=field)
        if not x.dtype.is_floating_point:
            raise InputError(f"{split}_x must be a floating-point tensor (got {x.dtype})", field=field)
    if not isinstance(bundle.num_classes, int) or bundle.num_classes < 1:
        raise InputError(f"num_classes must be a positive int (got {bundle.num_classes!r})", field=field)
    lo = min(int(bundle.train_y.min()), int(bundle.test_y.min()))
    hi = max(int(bundle.train_y.max()), int(bundle.test_y.max()))
    if lo < 0 or hi >= bundle.num_classes:
        raise InputError(f"labels range over {lo}..{hi} but num_classes is {bundle.num_classes} "
                         f"(labels must be 0..{bundle.num_classes - 1})", field=field)


def build_data(cfg: DataConfig, input_shape: tuple[int, ...] | None, seed: int) -> DataBundle:
    """Load the dataset a recipe names, then apply the recipe's subset limits. Unreadable data is an
    :class:`InputError` naming the file or field; out of memory an :class:`EnvironmentFailure`."""
    if ":" in cfg.dataset:
        fn = import_callable(cfg.dataset, field="data.dataset")
        try:
            bundle = fn(cfg, input_shape=input_shape, seed=seed)
        except (InputError, EnvironmentFailure):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise EnvironmentFailure(f"data.dataset: out of memory in {cfg.dataset!r}: {first_line(exc)}") from None
            raise InputError(f"dataset callable failed: {first_line(exc)}", field="data.dataset") from None
        if not isinstance(bundle, DataBundle):
            raise InputError(f"dataset callable must return compress.data.DataBundle (got {type(bundle).__name__})",
                             field="data.dataset")
        check_bundle(bundle, "data.dataset")
    else:
        loader = DATASETS.get(cfg.dataset, field="data.dataset")
        try:
            bundle = loader(cfg, input_shape=input_shape, seed=seed)
        except PermissionError as exc:
            raise EnvironmentFailure(f"data.root: cannot read {exc.filename or cfg.root!r}: permission denied") from None
        except OSError as exc:  # the files' fault (the loaders name the file for the formats they parse)
            where = exc.filename or cfg.root
            raise InputError(f"cannot read {str(where)!r}: {exc.strerror or first_line(exc)}", field="data.root") from None
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise EnvironmentFailure(f"data.dataset: out of memory loading {cfg.dataset!r}: {first_line(exc)}") from None
        check_bundle(bundle, "data.root" if cfg.root else "data.dataset")
    g = torch.Generator().manual_seed(seed)
    if cfg.limit_train and cfg.limit_train < len(bundle.train_x):
        idx = torch.randperm(len(bundle.train_x), generator=g)[: cfg.limit_train]
        bundle.train_x, bundle.train_y = bundle.train_x[idx], bundle.train_y[idx]
    if cfg.limit_test and cfg.limit_test < len(bundle.test_x):
        idx = torch.randperm(len(bundle.test_x), generator=g)[: cfg.limit_test]
        bundle.test_x, bundle.test_y = bundle.test_x[idx], bundle.test_y[idx]
    return bundle
