"""The objective for a recipe's ``task`` block."""
from __future__ import annotations

from .base import Objective
from .classification import Classification
from .custom import Custom
from .segmentation import Segmentation


def build_objective(cfg) -> Objective:
    """The objective for a :class:`~compress.tasks.config.TaskConfig` (None: classification)."""
    if cfg is None or cfg.name == "classification":
        return Classification()
    if cfg.name == "segmentation":
        return Segmentation(cfg.ignore_index)
    return Custom(cfg)
