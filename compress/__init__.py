"""compress: prune, 2:4-sparsify, distil, export and benchmark PyTorch models from one recipe."""
from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # ``compress.load`` imports torch on first use, not on ``import compress``: the command line
    # starts (and a Ctrl-C during start-up ends cleanly) before the heavy imports.
    if name == "load":
        from .api import load

        return load
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
