"""compress: prune, 2:4-sparsify, distil, export and benchmark PyTorch models from one recipe."""
from .api import load
from .version import __version__

__all__ = ["__version__", "load"]
