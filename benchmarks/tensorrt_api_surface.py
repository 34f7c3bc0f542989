"""Check, without a GPU, that every TensorRT Python name our backend uses exists in real TensorRT
releases: the names are read from ``compress/deploy/tensorrt.py`` (attributes taken from
``trt`` and from the TensorRT objects it creates), the releases are the ``tensorrt-cuXX-bindings``
wheels from PyPI, whose extension module carries every bound name as a string (pybind11 registers
classes, methods and enum members by name). The libraries themselves (``tensorrt-cuXX-libs``) are
not needed, so this runs on any machine that reaches PyPI.

    python benchmarks/tensorrt_api_surface.py --versions 10.3.0 10.8.0.43 10.13.3.9 10.16.1.11 11.4.0.106

Writes benchmarks/results/tensorrt_api_surface.md. What it cannot tell: whether a call *works*
(arguments, behaviour); only that the name exists in that release. Running the GPU tests
(``pytest -m "gpu or tensorrt"``) on a machine with TensorRT is the real check.
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "compress" / "deploy" / "tensorrt.py"
# Local names that hold TensorRT objects in the backend (the module, builder, config, ...).
TRT_OBJECTS = {"trt", "builder", "config", "network", "parser", "runtime", "engine", "profile", "inp",
               "self.engine", "self.context", "self._runtime"}
# Attributes read off those objects that are Python, not TensorRT (the version string, buffer protocol).
NOT_TRT = {"__version__", "__init__", "split"}


def _base(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return f"self.{node.attr}"
    return None


def used_names(source: Path = SOURCE) -> list[str]:
    """Every attribute chain rooted at a TensorRT object: ``trt.BuilderFlag.SPARSE_WEIGHTS`` gives
    BuilderFlag and SPARSE_WEIGHTS, ``config.set_flag`` gives set_flag."""
    tree = ast.parse(source.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, cur = [], node
        while isinstance(cur, (ast.Attribute, ast.Call)):
            if isinstance(cur, ast.Call):  # config.get_timing_cache().serialize(): keep walking
                cur = cur.func
                continue
            if (_base(cur) or "").startswith("self.") and _base(cur) in TRT_OBJECTS:
                break
            chain.append(cur.attr)
            cur = cur.value
        root = _base(cur)
        if root in TRT_OBJECTS and chain:
            names.update(chain)
    return sorted(names - NOT_TRT)


def bindings_names(wheel: Path) -> tuple[set[str], str]:
    """The NUL-terminated strings of the wheel's extension module (pybind11 keeps each bound name as
    one such string; docstrings are separate strings, so a name mentioned in prose does not count),
    plus its Python sources."""
    with zipfile.ZipFile(wheel) as z:
        so = next(n for n in z.namelist() if n.endswith("tensorrt.so"))
        blob = z.read(so)
        py = "\n".join(z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith(".py"))
    strings = {c.decode(errors="replace") for c in blob.split(b"\0") if 2 < len(c) < 200}
    return strings, py


def present(name: str, strings: set[str], py: str) -> bool:
    if name in strings or re.search(rf"\bdef {re.escape(name)}\b|\b{re.escape(name)} =", py):
        return True
    # the linker stores a string that is the tail of another only once ("INT8" as the end of "UINT8")
    return any(s.endswith(name) and not s[: -len(name)][-1:].isspace() for s in strings)


def fetch(version: str, cuda: str, dest: Path) -> Path:
    spec = f"tensorrt-{cuda}-bindings=={version}"
    for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64"):
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.11", "--platform", plat, "-d", str(dest), spec],
                           capture_output=True, text=True)
        if r.returncode == 0:
            break
    else:
        raise SystemExit(f"cannot download {spec}: {r.stderr.strip().splitlines()[-1] if r.stderr else ''}")
    return next(dest.glob(f"tensorrt_{cuda}_bindings-{version}-*.whl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", default=["10.3.0", "10.8.0.43", "10.13.3.9", "10.16.1.11", "11.4.0.106"])
    ap.add_argument("--cuda", default="cu12")
    args = ap.parse_args()
    names = used_names()
    table: dict[str, dict[str, bool]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.versions:
            strings, py = bindings_names(fetch(v, args.cuda, Path(tmp)))
            table[v] = {n: present(n, strings, py) for n in names}
    m = machine()
    lines = ["# TensorRT API names used by compress, checked against released bindings", "",
             f"Command: `python benchmarks/tensorrt_api_surface.py --versions {' '.join(args.versions)}`", "",
             f"- date: {m['date']}, commit {m['commit']}",
             f"- source: `compress/deploy/tensorrt.py`; wheels: `tensorrt-{args.cuda}-bindings` from PyPI",
             "- meaning: the name is bound in that release's Python module (present), nothing more: no GPU ran it",
             "", "| name | " + " | ".join(args.versions) + " |", "|---|" + "---|" * len(args.versions)]
    for n in names:
        lines.append(f"| `{n}` | " + " | ".join("yes" if table[v][n] else "**missing**" for v in args.versions) + " |")
    missing = {v: [n for n, ok in t.items() if not ok] for v, t in table.items()}
    lines += ["", "Missing per release: " + "; ".join(f"{v}: {', '.join(ms) or 'none'}" for v, ms in missing.items()),
              "", "Names are unqualified: `INT8` present means some class binds it (`DataType.INT8` outlives the "
              "`BuilderFlag.INT8` of weak typing). The backend sets the FP16/INT8 builder flags only for weakly "
              "typed builds, and `use_strong_typing` never picks weak typing on TensorRT >= 11, where "
              "`BuilderFlag.FP16` is gone."]
    print(write_results("tensorrt_api_surface", "\n".join(lines) + "\n", {"names": names, "present": table}))
    for v, ms in missing.items():
        print(f"{v}: {'missing ' + ', '.join(ms) if ms else 'all names present'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
