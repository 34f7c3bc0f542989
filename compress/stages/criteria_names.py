"""The names of the channel-pruning criteria (``importance:`` in a ``prune`` or ``search`` stage),
without the criteria themselves.

The criteria live in :data:`compress.structured.criteria.IMPORTANCES`, which imports Torch-Pruning
(and through it, where timm is installed, timm -> torchvision -> torch._dynamo: seconds). A recipe
is validated, strictly, before anything runs and by ``compress validate``; that reads only these
names. tests/test_criteria_names.py keeps this tuple equal to the registry's names.
"""
from __future__ import annotations

CRITERION_NAMES: tuple[str, ...] = (
    "bn_scale", "fpgm", "hessian", "kfac", "l1", "l2", "lamp", "obs", "random", "taylor")


def known_criterion(name: str, what: str = "criterion") -> str:
    """``name`` if it is a criterion's name, else a ValueError naming the known ones (a field validator's)."""
    if name not in CRITERION_NAMES:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(sorted(CRITERION_NAMES))})")
    return name
