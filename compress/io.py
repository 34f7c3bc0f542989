"""Writing files so that a reader never sees half of one: a temporary file in the same folder,
flushed to disk, then an atomic rename. Every artifact of a run (JSON, text, checkpoints, ONNX,
figures) goes through here. New files get the mode ``open()`` gives (0666 less the umask), so a
run directory written by root in a container stays readable by the host user.

Failures the machine or the user's paths cause (:func:`os_failure`) become one-line errors with a
documented exit code instead of a traceback: a full disk, a read-only file system or a permission
is an :class:`~compress.errors.EnvironmentFailure` (exit 4) naming the path; a path through a file,
a name too long for the file system or a file where a folder belongs is an
:class:`~compress.errors.InputError` (exit 2)."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import EnvironmentFailure, InputError

# The machine refused (exit 4): not the recipe's fault, not a bug.
_ENVIRONMENT = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EIO: "input/output error (the disk or file system failed)",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.ENOMEM: "out of memory",
    errno.ENOLCK: "the file system does not support locks",
}
# The path the user gave cannot work (exit 2).
_INPUT = {
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "it exists and is not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENAMETOOLONG: "a file or folder name in the path is too long for the file system",
}


def os_failure(exc: OSError, path: str | Path | None = None, field: str | None = None,
               action: str = "write") -> Exception | None:
    """The one-line error for ``exc`` when the machine or the user's path caused it, naming the
    file the OS names (or ``path`` when it names none, or only the temporary file beside
    ``path``); ``None`` for anything else (a bug)."""
    where = exc.filename
    if where is None or (path is not None and Path(os.fsdecode(where)).name.startswith(f".{Path(path).name}.")):
        where = path
    where = f" {str(where)!r}" if where is not None else ""
    if exc.errno in _ENVIRONMENT:
        return EnvironmentFailure(f"cannot {action}{where}: {_ENVIRONMENT[exc.errno]}")
    if exc.errno in _INPUT:
        return InputError(f"cannot {action}{where}: {_INPUT[exc.errno]}", field=field)
    return None


@contextlib.contextmanager
def os_errors(path: str | Path | None = None, field: str | None = None, action: str = "write") -> Iterator[None]:
    """Turn the OSErrors :func:`os_failure` knows into its one-line errors; re-raise the rest."""
    try:
        yield
    except OSError as exc:
        mapped = os_failure(exc, path, field, action)
        if mapped is None:
            raise
        raise mapped from None


def temp_name(path: str | Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside ``path`` for a file that is renamed onto ``path`` once complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def _write_replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    # O_EXCL on a fresh name, mode 0666: the kernel applies the umask (mkstemp would give 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here at the latest, before the name exists
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    with os_errors(path):
        _write_replace(path, data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float written as the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"`` (JSON has no such numbers; ``float(s)`` reads them back), tensors and numpy
    values as plain numbers/lists and paths as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else NON_FINITE[repr(obj)]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def as_number(v: Any) -> Any:
    """Read back what :func:`json_safe` wrote: ``"NaN"``/``"Infinity"``/``"-Infinity"`` -> float."""
    return float(v) if isinstance(v, str) and v in NON_FINITE.values() else v


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Valid JSON only: non-finite numbers become strings (:func:`json_safe`); ``allow_nan=False``
    makes anything that slipped past that an error instead of a bare ``NaN`` in the file."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
