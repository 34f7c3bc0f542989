"""Datasets behind a registry. Each loader returns a :class:`DataBundle` of in-memory tensors
(normalised float images, int64 labels); recipes pick one by name or by ``module:callable``.
Importing this package registers the built-in datasets."""
from __future__ import annotations

from . import builtin
from .base import DataBundle, build_data, make_loader
from .config import DataConfig
from .registry import DATASETS

__all__ = ["DATASETS", "DataBundle", "DataConfig", "build_data", "builtin", "make_loader"]
