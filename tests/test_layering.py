"""The package's shape, checked statically (no imports are executed).

Layering: the wings (train, structured, sparsity, lottery, deploy, search, data, zoo) and the base
modules (config, errors, io, paths, modules, metrics, progress, model_io, registry) know nothing of
stages, the recipe, the pipeline, the CLI or the API; stages do not know the pipeline, CLI or API;
the recipe does not know the pipeline, CLI or API; the pipeline does not know the CLI or API.

Every ``import`` in compress/**.py counts: module level, inside functions, and under
``if TYPE_CHECKING:``. Relative imports are resolved to absolute names, and ``from pkg import
name`` counts as an import of ``pkg.name`` when that is a module of compress.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "compress"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

WINGS = {"train", "structured", "sparsity", "lottery", "deploy", "search", "data", "zoo", "tasks"}
BASE = {"config", "errors", "io", "paths", "modules", "metrics", "progress", "model_io", "registry"}
UPPER = {"stages", "pipeline", "cli", "api", "recipe"}

# layer (first component under compress) -> layers it must not import
FORBIDDEN: dict[str, set[str]] = {
    **{layer: set(UPPER) for layer in WINGS | BASE},
    "stages": {"pipeline", "cli", "api"},
    "recipe": {"pipeline", "cli", "api"},
    "pipeline": {"cli", "api"},
}

# Known violations in code this change may not edit, as (importing file, imported module).
# Empty: none found. Anything added here must say which change removes it.
ALLOWED_LAYERING: set[tuple[str, str]] = set()
# Known cycles (each a sorted tuple of module names), same rule.
ALLOWED_CYCLES: set[tuple[str, ...]] = set()

MAX_SHARE = 0.20  # of the package's non-blank lines, per top-level folder or file


@dataclass(frozen=True)
class Import:
    file: str      # relative to the repository root
    line: int
    module: str    # absolute module name, resolved to a module of compress where possible


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str) -> str:
    """The longest prefix of ``module`` that is a module of compress (``compress.x.Y`` -> ``compress.x``)."""
    parts = module.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return module


def _imports(path: Path) -> list[Import]:
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    rel = str(path.relative_to(ROOT.parent))
    out: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # every scope, TYPE_CHECKING too
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    out.append(Import(rel, node.lineno, _resolve(alias.name)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # ``from pkg import submodule`` is an import of the submodule
                out.append(Import(rel, node.lineno, sub if sub in MODULES else _resolve(base)))
    return out


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_walk_sees_the_package():
    """Guard the guards: the walk finds the modules and resolves relative imports."""
    assert {"compress.stages", "compress.stages.base", "compress.recipe", "compress.structured.tp_compat"} <= set(MODULES)
    base_imports = {i.module for i in IMPORTS["compress.stages.base"]}
    assert {"compress.config", "compress.registry", "compress.stages.artifacts"} <= base_imports, base_imports
    assert "compress.stages.prune" in {i.module for i in IMPORTS["compress.stages"]}  # from . import prune
    assert {_layer(m) for m in MODULES} >= WINGS | BASE | UPPER, "a layer named in this test no longer exists"


def test_layering():
    violations = []
    for name, imports in IMPORTS.items():
        forbidden = FORBIDDEN.get(_layer(name), set())
        for imp in imports:
            if _layer(imp.module) in forbidden and (imp.file, imp.module) not in ALLOWED_LAYERING:
                violations.append(f"{imp.file}:{imp.line} imports {imp.module} "
                                  f"({_layer(name)} must not import {_layer(imp.module)})")
    assert not violations, "layering violations:\n  " + "\n  ".join(violations)


def test_allow_lists_are_not_stale():
    seen = {(i.file, i.module) for imps in IMPORTS.values() for i in imps}
    stale = ALLOWED_LAYERING - seen
    assert not stale, f"allow-listed layering violations that no longer exist (remove them): {sorted(stale)}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), by Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~80)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_on_a_known_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"}, "g": set()}
    assert sorted(_cycles(g)) == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert _example_path(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _example_path(g, ["f"]) == ["f", "f"]


def _example_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One closed walk through the component, to show how the cycle goes."""
    members = set(comp)
    start = comp[0]
    # BFS back to start from start's successors within the component
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_no_import_cycles():
    graph = {name: {i.module for i in imps if i.module in MODULES} for name, imps in IMPORTS.items()}
    found = [c for c in _cycles(graph) if tuple(c) not in ALLOWED_CYCLES]
    lines = []
    for comp in found:
        where = [f"{i.file}:{i.line} -> {i.module}" for m in comp for i in IMPORTS[m] if i.module in comp]
        lines.append(" -> ".join(_example_path(graph, comp)) + "\n      " + "\n      ".join(where))
    assert not found, f"{len(found)} import cycle(s) in compress:\n  " + "\n  ".join(lines)


NOQA_E402 = re.compile(r"#\s*noqa\s*:[^#\n]*\bE402\b", re.IGNORECASE)


def test_no_noqa_e402():
    hits = [f"{p.relative_to(ROOT.parent)}:{n}: {line.strip()}"
            for p in MODULES.values() for n, line in enumerate(p.read_text().splitlines(), 1) if NOQA_E402.search(line)]
    assert not hits, ("'noqa: E402' hides an import that is not at the top of its module (usually a cycle "
                      "worked around); move the import up or break the cycle:\n  " + "\n  ".join(hits))


def _non_blank(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def test_no_top_level_entry_holds_more_than_a_fifth_of_the_package():
    share: dict[str, int] = {}
    for path in MODULES.values():
        top = path.relative_to(ROOT).parts[0]
        share[top] = share.get(top, 0) + _non_blank(path)
    total = sum(share.values())
    too_big = {k: v for k, v in share.items() if v > MAX_SHARE * total}
    assert not too_big, ", ".join(f"compress/{k} holds {v} of {total} non-blank lines ({100 * v / total:.1f}% > "
                                  f"{100 * MAX_SHARE:.0f}%): split it" for k, v in sorted(too_big.items()))
