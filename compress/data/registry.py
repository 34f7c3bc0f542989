"""The dataset registry: name -> loader ``(cfg, input_shape=..., seed=...) -> DataBundle`` (of torch Datasets)."""
from __future__ import annotations

from typing import Callable

from ..registry import Registry

DATASETS: Registry[Callable] = Registry("dataset")
