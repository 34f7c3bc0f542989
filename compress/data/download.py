"""Fetch dataset files over HTTP(S) with an md5 check; files land atomically (temp + rename)."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import InputError


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right md5 is already there."""
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5_of(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                h.update(block)
                out.write(block)
        if md5 is not None and h.hexdigest() != md5:
            raise InputError(f"md5 mismatch for {url}: got {h.hexdigest()}, expected {md5}", field="data.download")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"download of {url} failed: {exc}", field="data.download") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
