"""Progress bars (rich) that switch off in quiet mode or when stderr is not a terminal."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_state = {"quiet": False}
console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def log(msg: str) -> None:
    if not _state["quiet"]:
        console.print(msg, highlight=False)


class _NullTask:
    def advance(self, n: int = 1, **fields) -> None:  # noqa: D401
        pass

    def update(self, **fields) -> None:
        pass


class _Task:
    def __init__(self, progress: Progress, tid):
        self._p, self._t = progress, tid

    def advance(self, n: int = 1, **fields) -> None:
        self._p.update(self._t, advance=n, **fields)

    def update(self, **fields) -> None:
        self._p.update(self._t, **fields)


@contextlib.contextmanager
def task(description: str, total: int | None) -> Iterator[_Task | _NullTask]:
    """A progress bar for ``total`` units; a no-op in quiet mode or without a terminal."""
    if _state["quiet"] or not sys.stderr.isatty():
        yield _NullTask()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                  transient=True) as p:
        yield _Task(p, p.add_task(description, total=total, info=""))
