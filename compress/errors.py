"""Error types and the exit codes they map to (the CLI's contract with CI).

=====  ==========================================================================================
code   meaning
=====  ==========================================================================================
0      success
1      a bug in compress (the only case that prints a traceback)
2      invalid input: a recipe field, a file, data, model code, a missing extra (:class:`InputError`,
       :class:`ModelBreakError`); one line naming the field, file or module
3      the run completed but a gate failed (:class:`GateError`); every artifact is written
4      the machine refused: disk full, out of memory, permission denied, read-only file system
       (:class:`EnvironmentFailure`); one line naming the path or the stage
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
