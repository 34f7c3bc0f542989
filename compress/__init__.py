"""compress: prune, 2:4-sparsify, distil, export and benchmark PyTorch models from one recipe."""
from .api import load

__version__ = "0.1.0"
__all__ = ["__version__", "load"]
