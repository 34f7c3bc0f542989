"""Error types that map to the CLI's exit codes.

``InputError`` (exit 2) is for anything the user can fix by editing the recipe or the files it
points at; its message is one line and names the field or file. ``GateError`` (exit 3) is raised
when the run finished but a recipe gate failed. Everything else is a bug (exit 1).
"""
from __future__ import annotations


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
