"""Fetch dataset files over HTTP(S) with an md5 check; files land atomically (temp + rename).

A download is bounded twice: every socket read by ``timeout`` and the whole file by ``deadline``
(a server that trickles a few bytes per second never trips a socket timeout). Running out of
either is an :class:`~compress.errors.EnvironmentFailure` (exit 4), not an input error (exit 2):
the recipe is valid and the same run can succeed on a retry or through a faster mirror, so CI
should treat it like a full disk or a lost network, not as a broken recipe. A server that answers
with an error, or a file with the wrong md5, remains an input error (the URL or the sums)."""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import EnvironmentFailure, InputError


_MACHINE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC)}


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _inside(root: Path, dest: Path) -> bool:
    root_r, dest_r = root.resolve(), dest.resolve()
    return dest_r != root_r and dest_r.is_relative_to(root_r)


def _timed_out(url: str, what: str) -> EnvironmentFailure:
    return EnvironmentFailure(f"data.download: {url} {what} (set data.download_timeout, or a faster mirror in data.url)")


def fetch(url: str, dest: Path, md5: str | None, timeout: float = 60.0, deadline: float = 1800.0,
          root: Path | None = None) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right md5 is already there. ``dest`` must
    lie inside ``root`` when given (``data.md5`` keys name files, never paths)."""
    dest = Path(dest)
    if root is not None and not _inside(Path(root), dest):
        raise InputError(f"{dest.name!r} would be written outside the data root {str(root)!r}", field="data.md5")
    if dest.exists() and (md5 is None or md5_of(dest) == md5):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        if exc.errno in _MACHINE_ERRNOS:
            raise EnvironmentFailure(f"data.root: cannot write in {str(dest.parent)!r}: {exc.strerror}") from None
        raise InputError(f"cannot write in {str(dest.parent)!r}: {exc.strerror or exc}", field="data.root") from None
    start = time.monotonic()
    received = 0
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=min(timeout, deadline)) as resp:
            while True:
                left = deadline - (time.monotonic() - start)
                if left <= 0:
                    raise _timed_out(url, f"did not finish within {deadline:g} s ({received:,} bytes received)")
                sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
                if sock is not None:  # no single read may outlive the deadline either
                    sock.settimeout(max(0.05, min(timeout, left)))
                block = resp.read1(1 << 16)  # what has arrived (one recv), so the deadline is checked often
                if not block:
                    break
                received += len(block)
                h.update(block)
                out.write(block)
        if md5 is not None and h.hexdigest() != md5:
            raise InputError(f"md5 mismatch for {url}: got {h.hexdigest()}, expected {md5}", field="data.download")
        os.replace(tmp, dest)
    except (TimeoutError, socket.timeout):
        elapsed = time.monotonic() - start
        if elapsed + 0.05 >= deadline:  # the read that ran into the deadline (its timeout was cut to what was left)
            raise _timed_out(url, f"did not finish within {deadline:g} s ({received:,} bytes received)") from None
        raise _timed_out(url, f"timed out after {elapsed:.1f} s with {received:,} bytes received "
                              f"(limits: {deadline:g} s in all, {timeout:g} s without data)") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise _timed_out(url, f"did not answer within {min(timeout, deadline):g} s") from None
        raise InputError(f"download of {url} failed: {exc}", field="data.download") from None
    except OSError as exc:
        if exc.errno in _MACHINE_ERRNOS:  # the data root's disk or permissions, not the URL
            raise EnvironmentFailure(f"data.root: cannot write {str(dest)!r}: {exc.strerror}") from None
        raise InputError(f"download of {url} failed: {exc}", field="data.download") from None
    except http.client.HTTPException as exc:  # e.g. the connection closed before Content-Length bytes
        raise InputError(f"download of {url} failed: {type(exc).__name__} {exc}", field="data.download") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
