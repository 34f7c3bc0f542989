"""Datasets behind a registry. Each loader returns a :class:`DataBundle` of torch Datasets (train,
test, optional val) read through DataLoaders; recipes pick one by name or by ``module:callable``.
Importing this package registers the built-in datasets."""
from __future__ import annotations

from . import builtin, hf, scenes
from .base import (CUSTOM_SIGNATURE, Augmented, DataBundle, LoaderOptions, TensorImages, build_data, label_bounds,
                   make_loader, targets_of)
from .config import DataConfig
from .registry import DATASETS

__all__ = ["CUSTOM_SIGNATURE", "DATASETS", "Augmented", "DataBundle", "DataConfig", "LoaderOptions", "TensorImages",
           "build_data", "builtin", "hf", "label_bounds", "make_loader", "scenes", "targets_of"]
