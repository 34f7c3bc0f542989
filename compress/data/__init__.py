"""Datasets behind a registry. Each loader returns a :class:`DataBundle` of in-memory tensors
(normalised float images, int64 labels); recipes pick one by name or by ``module:callable``."""
from __future__ import annotations

from .base import DATASETS, DataBundle, build_data, make_loader  # noqa: F401
from . import builtin  # noqa: F401,E402  (registers the built-in datasets)
