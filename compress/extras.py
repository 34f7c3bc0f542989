"""The optional extras (``[project.optional-dependencies]`` in pyproject.toml) and the top-level
modules they bring, so a missing one is reported as the extra to install, not a bare
``ModuleNotFoundError``. ``tests/test_input_errors_model_data.py`` checks this table against
pyproject.toml."""
from __future__ import annotations

import importlib.util

DISTRIBUTION = "compress-models"  # the name on PyPI (the import package and the command are `compress`)

# top-level module -> extra that installs it
EXTRA_OF_MODULE = {
    "transformers": "hf",
    "datasets": "hf-datasets",
    "optuna": "search",
    "tensorrt": "tensorrt",
}


def missing_extra(exc: BaseException) -> str | None:
    """The extra whose module ``exc`` (an ImportError) failed to import, or None."""
    if not isinstance(exc, ImportError):
        return None
    name = (getattr(exc, "name", None) or "").split(".")[0]
    return EXTRA_OF_MODULE.get(name)


def install_hint(exc: BaseException) -> str | None:
    """``module 'transformers' is not installed: pip install 'compress-models[hf]'`` for a missing extra."""
    extra = missing_extra(exc)
    if extra is None:
        return None
    return f"module {exc.name.split('.')[0]!r} is not installed: pip install '{DISTRIBUTION}[{extra}]'"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; an import blocked in sys.modules
        return False
