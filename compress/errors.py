"""Error types and the exit codes they map to (the CLI's contract with CI).

=====  ==========================================================================================
code   meaning
=====  ==========================================================================================
0      success
1      a bug in compress (the only case that prints a traceback)
2      invalid input: a recipe field, a file, data, model code, a missing extra (:class:`InputError`,
       :class:`ModelBreakError`); one line naming the field, file or module
3      the run completed but a gate failed (:class:`GateError`); every artifact is written
4      the machine refused: disk full, out of memory, permission denied, read-only file system, a
       download that stalls past ``data.download_timeout`` (:class:`EnvironmentFailure`); one line
       naming the path, the field or the stage
5      training diverged: a NaN/Inf loss (:class:`DivergedError`); one line naming stage and step
130    interrupted (Ctrl-C)
=====  ==========================================================================================
"""
from __future__ import annotations

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_GATE, EXIT_ENVIRONMENT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


class InputError(Exception):
    """Invalid user input: a recipe field, a model factory, a checkpoint, a data root."""

    def __init__(self, message: str, field: str | None = None, line: int | None = None):
        self.field = field
        self.line = line
        super().__init__(message)

    def __str__(self) -> str:  # one line, field first, YAML line if known
        msg = super().__str__()
        prefix = f"{self.field}: " if self.field else ""
        suffix = f" (line {self.line})" if self.line else ""
        return f"{prefix}{msg}{suffix}"


class GateError(Exception):
    """The run completed but one or more recipe gates failed."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__("; ".join(failures))


class ModelBreakError(Exception):
    """A structural change left the model unable to run (shape mismatch after pruning)."""


class EnvironmentFailure(Exception):
    """The machine refused something the run needs (disk full, out of memory, permissions); not a
    bug and not the recipe's fault. The message is one line naming the path or stage."""


class DivergedError(Exception):
    """Training produced a NaN/Inf loss; the message names the stage and step."""


def first_line(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` (one line, bounded): how a user's exception is quoted."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    name = type(exc).__name__
    out = f"{name}: {line}" if line else name
    return out if len(out) <= limit else out[: limit - 3] + "..."


_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory",
                "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the allocator refusing (CPU or CUDA): MemoryError, torch's
    OutOfMemoryError, or the RuntimeError torch raises for an impossible CPU allocation."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


INTERRUPTED: list[bool] = []  # set by on_sigint: once Ctrl-C arrived, whatever fails next is the interrupt


def on_sigint(signum, frame) -> None:
    """SIGINT handler for the command line: record the interrupt, then raise KeyboardInterrupt as
    Python's default handler does. A Ctrl-C that lands inside a C extension's import can surface as
    some other error (ImportError, RecursionError in a half-initialised numpy); the flag lets the CLI
    still report it as an interrupt (exit 130), not as a bug."""
    INTERRUPTED.append(True)
    raise KeyboardInterrupt
