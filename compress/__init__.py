"""compress: prune, 2:4-sparsify, distil, export and benchmark PyTorch models from one recipe."""
__version__ = "0.1.0"

from .api import load  # noqa: E402,F401
