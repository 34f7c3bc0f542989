"""How many intra-op threads training uses.

torch's default is one thread per physical core, whether or not those cores are free. On a shared
machine that is the slow choice: OpenMP threads spin-wait for a sibling the kernel descheduled,
so on a 2-core machine beside one busy process the quickstart's train stage did not finish within
the time one thread needed several times over (benchmarks/results/threads.md). The choice here
starts from the cores this process may run on (``os.sched_getaffinity``, capped by a cgroup CPU
quota), shares them among this machine's processes of the job (torchrun's ``LOCAL_WORLD_SIZE``)
and leaves one core per data-loader worker. It does not follow the load of the moment: thread
counts change float rounding, and a recipe with a seed must give the same metrics on the same
machine whatever else runs. Instead the cores other processes keep busy at the start are sampled
(``/proc/stat``) and, when fewer are idle than chosen, the run says so and suggests the count to
pin. A recipe's ``threads:`` or
``--threads`` replaces the choice, and so does ``OMP_NUM_THREADS`` in the environment (a fixed count also pins float rounding, which can depend on how
work is split across threads). Benchmark timings use their own fixed thread count
(``benchmark.threads``), set and restored around each measurement.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class ThreadChoice:
    intra_op: int
    source: str                  # "--threads", "recipe", "OMP_NUM_THREADS" or "auto"
    cores: int                   # CPUs this process may run on (affinity, cgroup quota)
    idle_cores: float | None     # of those, how many were idle when the run started (auto only)
    local_processes: int
    loader_workers: int

    def to_dict(self) -> dict:
        return asdict(self)


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (idle jiffies incl. iowait, total jiffies)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            v = [int(x) for x in fields[:8]]
            out[int(name[3:])] = (v[3] + v[4], sum(v))
    return out


def idle_cores(window_s: float = 0.3) -> float | None:
    """How many of this process's CPUs were idle over the next ``window_s`` seconds (None where
    /proc/stat cannot tell)."""
    try:
        allowed = os.sched_getaffinity(0)
        a = _cpu_times()
        time.sleep(window_s)
        b = _cpu_times()
    except (AttributeError, OSError, ValueError):
        return None
    idle = 0.0
    for cpu in allowed:
        if cpu in a and cpu in b and b[cpu][1] > a[cpu][1]:
            idle += (b[cpu][0] - a[cpu][0]) / (b[cpu][1] - a[cpu][1])
    return idle


def choose_threads(requested: int | None, source: str, local_processes: int = 1,
                   loader_workers: int = 0) -> ThreadChoice:
    """The intra-op thread count for this process (see the module docstring)."""
    cores = usable_cores()
    if requested is not None:
        return ThreadChoice(requested, source, cores, None, local_processes, loader_workers)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:  # the environment's explicit choice (torchrun sets 1 unless given one)
        return ThreadChoice(int(env), "OMP_NUM_THREADS", cores, None, local_processes, loader_workers)
    free = None
    if local_processes == 1:  # under torchrun the sibling processes are starting too: they are not "other load"
        free = idle_cores()
    n = max(1, cores // max(1, local_processes) - loader_workers)
    return ThreadChoice(n, "auto", cores, None if free is None else round(free, 2), local_processes, loader_workers)


def advice(choice: ThreadChoice) -> str | None:
    """A note when other processes kept cores busy at the start: the automatic count stays fixed
    per machine (determinism), so pinning a lower one is the user's call."""
    if choice.source != "auto" or choice.idle_cores is None:
        return None
    usable = max(1, math.floor(choice.idle_cores + 0.25))
    if usable >= choice.intra_op:
        return None
    return (f"only {choice.idle_cores:.1f} of {choice.cores} cores were idle when the run started; training uses "
            f"{choice.intra_op} threads (fixed per machine, so seeded runs repeat). If the other load stays, "
            f"--threads {usable} (or threads: {usable}) is faster: OpenMP threads spin-wait for a busy core")


def apply(choice: ThreadChoice) -> None:
    torch.set_num_threads(choice.intra_op)
