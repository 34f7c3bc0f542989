"""compress: prune, 2:4-sparsify, distil, export and benchmark PyTorch models from one recipe.

The Python API (:mod:`compress.api`) is reachable from here: ``compress.prune``,
``compress.sparsify``, ``compress.finetune``, ``compress.export_onnx``, ``compress.check_sparsity``,
``compress.run``, ``compress.search``, ``compress.save``, ``compress.load``, ``compress.save_pretrained``,
``compress.strip``.
"""
from __future__ import annotations

from .version import __version__

_API = ("prune", "sparsify", "finetune", "export_onnx", "check_sparsity", "run", "search", "save", "load", "save_pretrained",
        "strip")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # the API imports torch on first use, not on ``import compress``: the command line starts (and a
    # Ctrl-C during start-up ends cleanly) before the heavy imports
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
