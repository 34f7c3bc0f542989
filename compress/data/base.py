"""Data plumbing shared by every dataset: the bundle of splits, in-memory datasets, loaders, label
checks and the ``module:callable`` contract for a user's own data.

Every split is a :class:`torch.utils.data.Dataset` whose items are ``(inputs, target)``: ``inputs``
a tensor, a tuple of tensors (``model(*inputs)``) or a dict of tensors (``model(**inputs)``);
``target`` a class index (classification) or an ``[H, W]`` label map (segmentation). Stages read
them only through :class:`~torch.utils.data.DataLoader` s made by :func:`make_loader`, so a dataset
larger than memory (an image folder decoded per item) works like the small bundled ones.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..errors import EnvironmentFailure, InputError, first_line, is_out_of_memory
from ..registry import import_callable
from .config import DataConfig
from .preprocess import Preprocess
from .registry import DATASETS

LABEL_SCAN_LIMIT = 1000  # items read to check labels of a dataset that does not list them (see label_bounds)


class TensorImages(Dataset):
    """Images held in memory (the small bundled sets) behind the Dataset interface. ``images`` keep
    their stored dtype (uint8 for 8-bit sets: a quarter of float32) and are preprocessed per item;
    ``targets`` are class indices ``[N]`` or label maps ``[N, H, W]`` (resized with nearest)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, preprocess: Preprocess | None = None):
        self.images, self.targets, self.preprocess = images, targets, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.images[i], self.targets[i]
        if self.preprocess is not None:
            x = self.preprocess(x)
            if y.dim() >= 2:
                y = self.preprocess.geometry_tensor(y, mode="nearest")
        return x, y


class Augmented(Dataset):
    """``dataset`` with a random ``fn(inputs, target) -> (inputs, target)`` per item (training only).
    Its randomness is torch's global generator: seeded by the run in the main process and, in loader
    workers, by the DataLoader from the loader's seeded generator, so the same seed gives the same
    augmented batches."""

    def __init__(self, dataset: Dataset, fn: Callable):
        self.dataset, self.fn = dataset, fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return self.fn(x, y)


def _seed_worker(worker_id: int) -> None:
    """Python's and NumPy's generators in a loader worker follow torch's, which the DataLoader seeds
    from the loader's generator (a different stream per worker)."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


@dataclass
class LoaderOptions:
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None

    @classmethod
    def of(cls, cfg: DataConfig) -> "LoaderOptions":
        return cls(cfg.num_workers, cfg.pin_memory, cfg.persistent_workers, cfg.prefetch_factor)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                options: LoaderOptions | None = None, sampler=None) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (a seeded generator drives the shuffle and
    the workers' seeds). ``sampler`` (e.g. a DistributedSampler) replaces the shuffle."""
    o = options or LoaderOptions()
    kw: dict[str, Any] = {}
    if o.num_workers:
        kw = {"num_workers": o.num_workers, "worker_init_fn": _seed_worker,
              "persistent_workers": o.persistent_workers}
        if o.prefetch_factor:
            kw["prefetch_factor"] = o.prefetch_factor
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=g, drop_last=drop_last and len(dataset) > batch_size, pin_memory=o.pin_memory, **kw)


def targets_of(ds) -> torch.Tensor | None:
    """All labels of ``ds`` when it lists them without reading its items (in-memory sets, image
    folders, HF datasets; through Subset and Augmented), else None."""
    if isinstance(ds, Subset):
        inner = targets_of(ds.dataset)
        return None if inner is None else inner[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, Augmented):
        return targets_of(ds.dataset)
    t = getattr(ds, "targets", None)
    if t is None:
        return None
    return t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t))


def label_bounds(ds, seed: int = 0, ignore_index: int | None = None,
                 limit: int = LABEL_SCAN_LIMIT) -> tuple[int, int, int, bool]:
    """``(lowest, highest, how many read, exhaustive)`` label of ``ds`` (``ignore_index`` left out).

    A dataset that lists its labels (``targets``) is checked completely at no cost. Any other is
    checked on at most ``limit`` items at seeded random positions: reading every item of a large
    custom dataset (decoding millions of images) to check labels would cost as much as an epoch, so
    a bounded sample catches the common mistakes (1-based labels, too few model outputs) and the
    training loop's cross-entropy still refuses any label the sample missed."""
    t = targets_of(ds)
    exhaustive = t is not None
    if t is None:
        n = len(ds)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist() if n > limit \
            else range(n)
        t = torch.cat([torch.as_tensor(ds[i][1]).reshape(-1) for i in idx]) if n else torch.zeros(0)
    t = torch.as_tensor(t).reshape(-1)
    if ignore_index is not None:
        t = t[t != ignore_index]
    if t.numel() == 0:
        return 0, -1, 0, exhaustive
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError(f"labels must be integers (got {t.dtype})", field="data.dataset")
    return int(t.min()), int(t.max()), int(t.numel()), exhaustive


class BadFileLog:
    """Names of files skipped under ``data.on_bad_file: skip``. Loader workers are separate
    processes, so each skip is appended as one line to a file the main process reads back."""

    def __init__(self):
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix="compress-skipped-", suffix=".txt")
        import os

        os.close(fd)

    def add(self, name: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(name.replace("\n", " ") + "\n")

    def names(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return sorted({line.rstrip("\n") for line in f if line.strip()})
        except FileNotFoundError:
            return []


@dataclass
class DataBundle:
    """The splits of one dataset. ``val`` is the dataset's own validation split when it has one (a
    stage that asks for validation data carves it from ``train`` otherwise). ``augment`` is applied to
    training batches only (:meth:`train_dataset`)."""

    train: Dataset
    test: Dataset
    num_classes: int | None = None
    val: Dataset | None = None
    preprocess: Preprocess | None = None
    augment: Callable | None = None
    augment_backend: str | None = None
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    bad_files: BadFileLog | None = None
    name: str = ""
    verify: Callable | None = None  # (bundle, limit, seed): decode files before training (image folders)

    def train_dataset(self, augmented: bool = True) -> Dataset:
        return Augmented(self.train, self.augment) if augmented and self.augment is not None else self.train

    def example(self, split: str = "test", index: int = 0):
        """One item's inputs (no batch dimension)."""
        return getattr(self, split)[index][0]

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample's input when it is a single tensor, else None."""
        x = self.example("train")
        return tuple(x.shape) if isinstance(x, torch.Tensor) else None

    def split_validation(self, n_val: int, seed: int) -> tuple["DataBundle", Dataset]:
        """Hold out ``n_val`` training examples (fixed by ``seed``) as a validation split."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self.train), generator=g)
        val_idx, tr_idx = perm[:n_val].tolist(), perm[n_val:].tolist()
        rest = DataBundle(Subset(self.train, tr_idx), self.test, self.num_classes, None, self.preprocess,
                          self.augment, self.augment_backend, self.loader, self.bad_files, self.name, self.verify)
        return rest, Subset(self.train, val_idx)

    def skipped_files(self) -> list[str]:
        return self.bad_files.names() if self.bad_files is not None else []

    def describe(self) -> dict[str, Any]:
        """The data block of ``summary.json``."""
        out: dict[str, Any] = {"dataset": self.name, "train_samples": len(self.train), "test_samples": len(self.test),
                               "num_classes": self.num_classes,
                               "preprocess": self.preprocess.contract() if self.preprocess else None,
                               "augment_backend": self.augment_backend}
        if self.val is not None:
            out["val_samples"] = len(self.val)
        if self.bad_files is not None:
            names = self.skipped_files()
            out["skipped_files"] = len(names)
            out["skipped_examples"] = names[:10]
        return out


def _is_dataset(obj) -> bool:
    return isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__")


CUSTOM_SIGNATURE = "fn(cfg, *, seed) -> dict(train=Dataset, test=Dataset, val=Dataset or None, num_classes=int)"


def from_callable(result: Any, field: str = "data.dataset") -> DataBundle:
    """Check what a user's dataset callable returned and wrap it (see :data:`CUSTOM_SIGNATURE`)."""
    if isinstance(result, DataBundle):
        parts = {"train": result.train, "test": result.test, "val": result.val, "num_classes": result.num_classes}
    elif isinstance(result, dict):
        parts = dict(result)
    else:
        raise InputError(f"the dataset callable must return a dict with train/test Datasets ({CUSTOM_SIGNATURE}), "
                         f"got {type(result).__name__}", field=field)
    unknown = sorted(set(parts) - {"train", "test", "val", "num_classes"})
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} in the returned dict (keys: train, test, val, num_classes)",
                         field=field)
    for split in ("train", "test", "val"):
        ds = parts.get(split)
        if ds is None and split == "val":
            continue
        if not _is_dataset(ds):
            what = "missing" if ds is None else f"a {type(ds).__name__}"
            raise InputError(f"{split!r} must be a torch.utils.data.Dataset with __len__ (map-style), got {what} "
                             f"({CUSTOM_SIGNATURE})", field=field)
        if len(ds) == 0:
            raise InputError(f"the {split} split is empty", field=field)
        item = ds[0]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"items of {split!r} must be (inputs, target) pairs, got a {type(item).__name__}",
                             field=field)
    nc = parts.get("num_classes")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise InputError(f"num_classes must be a positive int (got {nc!r})", field=field)
    return DataBundle(parts["train"], parts["test"], nc, parts.get("val"))


def _seeded_subset(ds: Dataset, limit: int | None, g: torch.Generator) -> Dataset:
    if limit and limit < len(ds):
        return Subset(ds, torch.randperm(len(ds), generator=g)[:limit].tolist())
    return ds


def _auto_statistics(bundle: DataBundle, cfg: DataConfig, seed: int) -> None:
    """``mean: auto``: per-channel statistics of at most ``auto_samples`` training images (seeded
    positions, after resize/crop, pixels in [0, 1]), computed once; the contract records how."""
    from .preprocess import auto_statistics

    p = bundle.preprocess
    if p is None:
        raise InputError(f"mean: auto needs a dataset compress preprocesses (built-in, imagefolder, hf_disk); "
                         f"{cfg.dataset!r} preprocesses its own items", field="data.preprocess.mean")
    p.mean = p.std = None
    n = min(cfg.preprocess.auto_samples, len(bundle.train))
    idx = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed + 17))[:n].tolist()
    mean, std = auto_statistics(bundle.train[i][0] for i in idx)
    p.mean, p.std = mean, std
    p.source = f"auto: computed from {n} training images (seeded sample)"


def build_data(cfg: DataConfig, input_shape: tuple[int, ...] | None, seed: int) -> DataBundle:
    """Load the dataset a recipe names, then apply the recipe's subset limits, loader options and
    augmentation. Unreadable data is an :class:`InputError` naming the file or field; out of memory
    an :class:`EnvironmentFailure`."""
    from .augment import build_augment

    if ":" in cfg.dataset:
        fn = import_callable(cfg.dataset, field="data.dataset")
        try:
            result = fn(cfg, seed=seed)
        except (InputError, EnvironmentFailure):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise EnvironmentFailure(f"data.dataset: out of memory in {cfg.dataset!r}: {first_line(exc)}") from None
            raise InputError(f"dataset callable failed: {first_line(exc)}", field="data.dataset") from None
        bundle = from_callable(result)
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
    if cfg.check_images and bundle.verify is not None:
        bundle.verify(bundle, cfg.check_images, seed)
    if cfg.preprocess.mean == "auto":
        _auto_statistics(bundle, cfg, seed)
    g = torch.Generator().manual_seed(seed)
    bundle.train = _seeded_subset(bundle.train, cfg.limit_train, g)
    bundle.test = _seeded_subset(bundle.test, cfg.limit_test, g)
    bundle.name = cfg.dataset
    bundle.loader = LoaderOptions.of(cfg)
    bundle.augment, bundle.augment_backend = build_augment(cfg.augment)
    return bundle
