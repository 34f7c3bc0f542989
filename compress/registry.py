"""A tiny name -> object registry used for models, datasets, criteria, stages and backends."""
from __future__ import annotations

import importlib
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


def import_callable(spec: str, field: str | None = None) -> Callable:
    """Resolve ``"package.module:attr"`` to a callable, with a one-line error when it fails."""
    if ":" not in spec:
        raise InputError(f"expected 'module:callable', got {spec!r}", field=field)
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
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
