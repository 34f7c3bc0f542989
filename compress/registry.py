"""A tiny name -> object registry used for models, datasets, criteria, stages and backends."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from .errors import InputError, first_line
from .extras import install_hint

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str, field: str | None = None) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise InputError(f"unknown {self.what} {name!r} (known: {known})", field=field) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


# Folders searched for a ``module:callable`` that is not importable from ``sys.path``: the folder of
# every recipe loaded in this process (``compress.recipe.load_recipe`` adds it), then the working
# directory — as ``python recipe_dir/script.py`` would see them, without ``PYTHONPATH=.``.
_IMPORT_ROOTS: list[Path] = []


def add_import_root(folder: str | Path) -> None:
    """Let ``module:callable`` specs find modules in ``folder`` (a recipe's folder)."""
    folder = Path(folder).resolve()
    if folder not in _IMPORT_ROOTS:
        _IMPORT_ROOTS.append(folder)


def _findable_in(root: Path, top: str) -> bool:
    return (root / f"{top}.py").is_file() or (root / top).is_dir()


def import_module(mod_name: str):
    """``importlib.import_module``, then, if the top-level module is nowhere on ``sys.path``, again
    with the first of the recipe folders and the working directory that holds it appended to
    ``sys.path`` (appended: an installed module of the same name still wins)."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        top = mod_name.split(".")[0]
        if exc.name != top:
            raise
        root = next((r for r in [*_IMPORT_ROOTS, Path.cwd().resolve()] if _findable_in(r, top)), None)
        if root is None:
            raise
        if str(root) not in sys.path:
            sys.path.append(str(root))
        importlib.invalidate_caches()
        return importlib.import_module(mod_name)


def import_callable(spec: str, field: str | None = None) -> Callable:
    """Resolve ``"package.module:attr"`` to a callable, with a one-line error when it fails. The
    module is looked up on ``sys.path``, then in the recipe's folder and the working directory
    (:func:`import_module`)."""
    if ":" not in spec:
        raise InputError(f"expected 'module:callable', got {spec!r}", field=field)
    mod_name, _, attr = spec.partition(":")
    try:
        mod = import_module(mod_name)
    except Exception as exc:  # ImportError, or an error raised while importing user code
        why = install_hint(exc) or first_line(exc)
        raise InputError(f"cannot import module {mod_name!r}: {why}", field=field) from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"module {mod_name!r} has no attribute {attr!r}", field=field)
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{spec!r} is not callable", field=field)
    return obj
