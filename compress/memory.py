"""How much memory this machine can give, and a check that turns an impossible allocation (an input
shape or dataset that needs hundreds of GB) into one line and exit 4 before anything is allocated,
instead of a failed allocation deep in torch or the kernel's OOM killer."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import EnvironmentFailure


def available_bytes() -> int | None:
    """Memory available to this process now: MemAvailable, capped by a cgroup (container) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            avail = min(avail, int(raw))
    return avail


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def require_memory(nbytes: int, what: str, field: str) -> None:
    """Raise :class:`EnvironmentFailure` naming ``field`` when ``nbytes`` cannot fit in memory."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise EnvironmentFailure(f"{field}: {what} needs {_gb(nbytes)} of memory, this machine has "
                                 f"{_gb(avail)} available")
