"""Packaging: `compress --version`, the recipes installed with the package (`compress recipes`,
`compress init NAME [DIR]`), the distribution name in every install hint, and `module:callable`
specs found beside the recipe or in the working directory."""
from __future__ import annotations

import tomllib

import yaml

from conftest import REPO, cli, tiny_recipe


def test_version():
    from compress.version import __version__

    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"compress {__version__}"


def test_recipes_lists_the_packaged_files_and_repo_links_to_them():
    res = cli("recipes")
    assert res.returncode == 0, res.stderr
    names = {line.split()[0] for line in res.stdout.splitlines()}
    packaged = {p.stem for p in (REPO / "compress" / "recipes").glob("*.yaml")}
    assert "quickstart" in names and names == packaged
    for p in (REPO / "recipes").glob("*.yaml"):  # the repository's recipes/ are the packaged files
        assert p.resolve() == (REPO / "compress" / "recipes" / p.name).resolve()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "recipes/*.yaml" in data["tool"]["setuptools"]["package-data"]["compress"]


def test_init_copies_refuses_to_overwrite_and_names_unknown(tmp_path):
    import pytest

    from compress.errors import InputError
    from compress.recipe import load_recipe
    from compress.recipes import copy_to

    res = cli("init", "quickstart", str(tmp_path))
    assert res.returncode == 0, res.stderr
    copied = tmp_path / "quickstart.yaml"
    assert copied.read_bytes() == (REPO / "compress" / "recipes" / "quickstart.yaml").read_bytes()
    assert load_recipe(copied).name == "quickstart"
    unknown = cli("init", "nosuch", str(tmp_path / "x.yaml"))
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "nosuch" in unknown.stderr and "quickstart" in unknown.stderr
    with pytest.raises(InputError, match="not overwriting"):
        copy_to("quickstart", tmp_path)
    assert copy_to("quickstart.yaml", tmp_path / "sub" / "mine.yaml") == tmp_path / "sub" / "mine.yaml"


def test_distribution_name_in_pyproject_and_hints():
    from compress.extras import DISTRIBUTION, install_hint

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert data["name"] == DISTRIBUTION == "compress-models"
    assert data["scripts"]["compress"]
    assert not any(d.startswith("torch") and "<" in d for d in data["dependencies"] if d.split(">")[0] == "torch")
    err = ModuleNotFoundError("No module named 'transformers'", name="transformers")
    assert install_hint(err) == "module 'transformers' is not installed: pip install 'compress-models[hf]'"


NET = """
import torch
from torch import nn


def build(num_classes: int = 10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
"""


def _own_recipe(folder):
    r = tiny_recipe(model={"factory": "mynet_beside:build", "kwargs": {"num_classes": 10}, "input_shape": [1, 8, 8]},
                    stages=[{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
                            {"kind": "sparsify", "pattern": "2:4"}])
    (folder / "mynet_beside.py").write_text(NET)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def test_own_module_beside_the_recipe_without_pythonpath(tmp_path, one_thread):
    """The recipe's folder is importable (run from elsewhere); a copied run directory then loads
    where the module is importable, and elsewhere fails with one line naming the module and the
    portable alternative."""
    folder = tmp_path / "project"
    folder.mkdir()
    recipe = _own_recipe(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = cli("run", str(recipe), "--out", str(tmp_path / "run"), "-q", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    # the working directory is importable too: load from the project folder, allowing the module
    load = ("import compress, sys; m = compress.load(sys.argv[1], allow=['mynet_beside']); "
            "print(type(m).__name__)")
    ok = _python(load, str(tmp_path / "run"), cwd=folder)
    assert ok.returncode == 0 and ok.stdout.strip() == "Sequential", ok.stderr
    missing = _python(load, str(tmp_path / "run"), cwd=elsewhere)
    assert missing.returncode == 1
    last = missing.stderr.strip().splitlines()[-1]
    assert "mynet_beside" in last and "model.pt2" in last and "PYTHONPATH" in last


def _python(code, *args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
