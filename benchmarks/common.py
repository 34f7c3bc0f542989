"""Shared bits for benchmark scripts: machine description and result writing."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit()}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def write_results(name: str, markdown: str, data: dict) -> Path:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    from compress.io import atomic_write_json, atomic_write_text

    atomic_write_text(out / f"{name}.md", markdown)
    atomic_write_json(out / f"{name}.json", data)
    return out / f"{name}.md"


def machine_lines(m: dict) -> str:
    return (f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}\n"
            f"- versions: python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}\n"
            f"- date: {m['date']}, commit {m['commit']}\n")


__all__ = ["machine", "write_results", "machine_lines", "json"]
