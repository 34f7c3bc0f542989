"""Issue 13, search and analysis inputs: a missing extra, a storage URL that cannot work and two
networks that cannot be interpolated are one-line input errors (exit 2), found when the recipe is
loaded where possible — not after the stages before the search have trained."""
from __future__ import annotations

import os
import sys

import pytest

from compress.errors import InputError
from compress.model_io import save_portable
from compress.recipe import validate_data
from compress.zoo import small_cnn
from conftest import cli, tiny_recipe


def _search_recipe(**search) -> dict:
    r = tiny_recipe()
    r["stages"] = [r["stages"][0], {"kind": "search", **search}]
    return r


@pytest.mark.parametrize("storage, message", [
    ("sqlite:////no-such-folder-here/study.db", "the folder of the SQLite file, '/no-such-folder-here', does not exist"),
    ("sqlite:///no-such-folder-here/study.db", "'no-such-folder-here', does not exist"),
    ("oracle://host/db", "unsupported database 'oracle'"),
    ("postgresql+nosuchdriver://host/db", "postgresql storage needs a database driver: pip install nosuchdriver"),
])
def test_unusable_storage_is_refused_at_load(storage, message):
    with pytest.raises(InputError) as ei:
        validate_data(_search_recipe(storage=storage))
    assert ei.value.field == "stages[1].storage" and message in str(ei.value)


@pytest.mark.parametrize("storage", ["sqlite:///study.db", "sqlite://"])
def test_usable_storage_is_accepted(storage):
    assert validate_data(_search_recipe(storage=storage)).stages[1].storage == storage


def test_search_without_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an uninstalled package looks like to find_spec
    with pytest.raises(InputError) as ei:
        validate_data(_search_recipe())
    assert ei.value.field == "stages[1]" and "pip install 'compress-models[search]'" in str(ei.value)


def test_search_without_optuna_through_the_cli(write_recipe, tmp_path, monkeypatch):
    blocker = tmp_path / "block"  # a sitecustomize that makes optuna unimportable in the CLI process
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['optuna'] = None\n")
    monkeypatch.setenv("PYTHONPATH", str(blocker) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = cli("validate", str(write_recipe(_search_recipe())), process=True)  # PYTHONPATH: a real process
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "stages[1]" in res.stderr and "compress-models[search]" in res.stderr


def test_interpolating_networks_of_different_shapes_is_an_input_error(tmp_path, write_recipe):
    save_portable(small_cnn(in_channels=1, width=8), tmp_path / "a", "small_cnn", {"in_channels": 1, "width": 8}, [1, 8, 8])
    save_portable(small_cnn(in_channels=1, width=16), tmp_path / "b", "small_cnn", {"in_channels": 1, "width": 16},
                  [1, 8, 8])
    res = cli("--quiet", "analyze", "interpolate", str(tmp_path / "a"), str(tmp_path / "b"),
              "--recipe", str(write_recipe(tiny_recipe())), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "checkpoint: the two networks differ in shape at" in res.stderr and "same architecture" in res.stderr
    assert not (tmp_path / "out" / "interpolation.json").exists()
