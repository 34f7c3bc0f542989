"""Invalid input: exit 2, one line naming the field (and the YAML line), no traceback."""
from __future__ import annotations

import pytest
import yaml

from conftest import cli, tiny_recipe


def _assert_input_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    for n in needles:
        assert n in err[0], (n, err[0])


def test_validate_ok(write_recipe):
    res = cli("validate", str(write_recipe(tiny_recipe())))
    assert res.returncode == 0, res.stderr
    assert "7 stages" in res.stdout


def test_quickstart_recipe_validates():
    from conftest import REPO

    res = cli("validate", str(REPO / "recipes" / "quickstart.yaml"))
    assert res.returncode == 0, res.stderr


def test_ratio_ge_one_names_field_and_line(write_recipe):
    r = tiny_recipe()
    r["stages"][1]["ratio"] = 1.0
    res = cli("validate", str(write_recipe(r)))
    _assert_input_error(res, "stages[1].ratio", "< 1", "line")


def test_yaml_line_is_the_ratio_line(write_recipe):
    text = yaml.safe_dump(tiny_recipe(), sort_keys=False).replace("ratio: 0.5", "ratio: 1.5")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "ratio: 1.5" in t)
    res = cli("validate", str(write_recipe(text)))
    _assert_input_error(res, "stages[1].ratio", f"(line {line})")


def test_wrong_type(write_recipe):
    r = tiny_recipe()
    r["data"]["batch_size"] = "lots"
    _assert_input_error(cli("validate", str(write_recipe(r))), "data.batch_size")


def test_unknown_key(write_recipe):
    r = tiny_recipe()
    r["stages"][2]["epohcs"] = 3
    _assert_input_error(cli("validate", str(write_recipe(r))), "stages[2].epohcs", "unknown field")


def test_unknown_top_level_key(write_recipe):
    r = tiny_recipe()
    r["gatez"] = {}
    _assert_input_error(cli("validate", str(write_recipe(r))), "gatez")


def test_unknown_stage_kind(write_recipe):
    r = tiny_recipe()
    r["stages"].append({"kind": "quantise"})
    _assert_input_error(cli("validate", str(write_recipe(r))), "stages[7].kind", "quantise")


def test_unknown_dataset(write_recipe):
    r = tiny_recipe()
    r["data"]["dataset"] = "imagenet22k"
    _assert_input_error(cli("validate", str(write_recipe(r))), "data.dataset", "imagenet22k")


@pytest.mark.parametrize("factory, needle", [
    ("not_a_model", "unknown zoo model"),
    ("nosuchmodule_xyz:build", "cannot import module"),
    ("compress.zoo:no_such_fn", "no attribute"),
    ("compress.zoo:", "module:callable"),
])
def test_bad_factory(write_recipe, tmp_path, factory, needle):
    r = tiny_recipe()
    r["model"]["factory"] = factory
    # validate checks the string; run resolves it (import errors surface there)
    res = cli("run", str(write_recipe(r)), "--out", str(tmp_path / "run"))
    _assert_input_error(res, "model.factory", needle)


def test_missing_checkpoint(write_recipe):
    r = tiny_recipe()
    r["model"]["checkpoint"] = "/no/such/weights.safetensors"
    _assert_input_error(cli("validate", str(write_recipe(r))), "model.checkpoint", "does not exist")


def test_checkpoint_that_is_a_pickle_is_refused(write_recipe, tmp_path):
    import pickle

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"weight": object()}))
    r = tiny_recipe()
    r["model"]["checkpoint"] = str(bad)
    res = cli("run", str(write_recipe(r)), "--out", str(tmp_path / "run"))
    _assert_input_error(res, "model.checkpoint", "safely")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_checkpoint_wrong_shapes(write_recipe, tmp_path):
    import torch

    from compress.zoo import small_cnn

    p = tmp_path / "w.pt"
    torch.save(small_cnn(width=8).state_dict(), p)
    r = tiny_recipe()
    r["model"]["checkpoint"] = str(p)
    _assert_input_error(cli("run", str(write_recipe(r)), "--out", str(tmp_path / "run")), "model.checkpoint", "do not fit")


def test_missing_data_root(write_recipe, tmp_path):
    r = tiny_recipe()
    r["data"] = {"dataset": "mnist", "root": str(tmp_path / "nothing-here")}
    _assert_input_error(cli("run", str(write_recipe(r)), "--out", str(tmp_path / "run")), "data.root", "does not exist")


def test_invalid_yaml_reports_line(write_recipe):
    res = cli("validate", str(write_recipe("name: x\nmodel: {factory: small_cnn\nstages: [\n")))
    _assert_input_error(res, "invalid YAML", "line")


def test_missing_recipe_file():
    _assert_input_error(cli("validate", "/no/such/recipe.yaml"), "recipe", "does not exist")


def test_set_override_is_validated(write_recipe):
    p = write_recipe(tiny_recipe())
    _assert_input_error(cli("validate", str(p), "--set", "stages.1.ratio=2"), "stages[1].ratio")
    ok = cli("validate", str(p), "--set", "stages.1.ratio=0.3")
    assert ok.returncode == 0, ok.stderr


def test_set_override_takes_effect():
    from compress.recipe import apply_overrides, validate_data

    data = apply_overrides(tiny_recipe(), ["stages.1.ratio=0.3", "data.batch_size=32", "seed=7"])
    r = validate_data(data)
    assert r.stages[1].ratio == 0.3 and r.data.batch_size == 32 and r.seed == 7


def test_nonempty_run_dir_without_resume(write_recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    _assert_input_error(cli("run", str(write_recipe(tiny_recipe())), "--out", str(out)), "--out", "not empty")


def test_schema_command_is_json_schema():
    import json

    res = cli("schema")
    assert res.returncode == 0, res.stderr
    schema = json.loads(res.stdout)
    assert set(schema["properties"]) >= {"name", "seed", "model", "data", "stages", "gates"}
    # the stage union is discriminated by kind so editors can complete each stage's fields
    assert "prune" in json.dumps(schema["$defs"])


def test_every_shipped_recipe_validates():
    from conftest import REPO

    from compress.recipe import load_recipe

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for p in recipes:
        load_recipe(p)  # raises InputError with the field on failure
