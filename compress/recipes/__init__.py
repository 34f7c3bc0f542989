"""The recipes installed with the package (``compress recipes`` lists them, ``compress init NAME``
copies one to start from). The YAML files here are the canonical copies; the repository's
``recipes/`` folder links to them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_bytes, os_errors

FOLDER = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PackagedRecipe:
    name: str          # the file name without .yaml
    path: Path
    summary: str       # the file's first comment line


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def packaged() -> list[PackagedRecipe]:
    return [PackagedRecipe(p.stem, p, _summary(p)) for p in sorted(FOLDER.glob("*.yaml"))]


def find(name: str) -> PackagedRecipe:
    """The packaged recipe ``name`` (``quickstart`` or ``quickstart.yaml``)."""
    stem = name.removesuffix(".yaml")
    for r in packaged():
        if r.name == stem:
            return r
    known = ", ".join(r.name for r in packaged())
    raise InputError(f"no packaged recipe {name!r} (known: {known}; `compress recipes` lists them)", field="NAME")


def copy_to(name: str, destination: str | Path | None = None) -> Path:
    """Copy a packaged recipe to ``destination`` (a file, or a folder that receives NAME.yaml; default
    the working directory). Refuses to overwrite an existing file."""
    recipe = find(name)
    dest = Path(destination) if destination is not None else Path.cwd()
    if dest.is_dir() or (destination is not None and str(destination).endswith(("/", "\\"))):
        dest = dest / recipe.path.name
    if dest.exists():
        raise InputError(f"{str(dest)!r} exists; not overwriting it (choose another destination)", field="DIR")
    with os_errors(dest, field="DIR"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, recipe.path.read_bytes())
    return dest
