"""The zoo's registry, apart from the models so that each model module can register itself
without importing the package that imports it."""
from __future__ import annotations

from ..registry import Registry

MODELS: Registry = Registry("model")
