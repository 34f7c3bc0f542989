"""Issue 13, the recipe's share: every recipe the code cannot use is refused before anything runs,
through the real CLI, with exit 2, one line naming the field or file (and the YAML line), and no
traceback. Tables of bad inputs per class: the YAML file itself, values the schema used to accept,
``--set`` paths, stage order, ``schema --out``."""
from __future__ import annotations

import copy
import errno
import time

import pytest
import yaml

from conftest import REPO, cli, tiny_recipe


def _assert_input_error(res, *needles, code: int = 2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    for n in needles:
        assert n in err[0], (n, err[0])


def _text(r: dict) -> str:
    return yaml.safe_dump(r, sort_keys=False)


def _line_of(text: str, needle: str, nth: int = 1) -> int:
    return [i for i, t in enumerate(text.splitlines(), 1) if needle in t][nth - 1]


def _bomb(indent: str = "") -> str:
    """The billion laughs: nine levels of nine aliases, 9**9 values once expanded."""
    lines = [f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        lines.append(f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


SMALL = ("name: t\nmodel: {factory: small_cnn, kwargs: {num_classes: 10, in_channels: 1, width: 8}, "
         "input_shape: [1, 8, 8]}\ndata: {dataset: digits}\n")

# (id, file content (str or bytes), needles in the one error line; "{file}" is the recipe's path)
BAD_FILES = [
    ("duplicate-top-level-key", "name: a\nname: b\n" + SMALL.split("\n", 1)[1] + "stages: [{kind: train}]\n",
     ["name: ", "given twice", "lines 1 and 2"]),
    ("duplicate-key-in-stage", SMALL + "stages:\n  - kind: train\n    epochs: 1\n    epochs: 2\n",
     ["stages[0].epochs", "given twice", "lines 6 and 7"]),
    ("duplicate-factory", "name: t\nmodel:\n  factory: small_cnn\n  input_shape: [1, 8, 8]\n"
                          "  factory: resnet20\nstages: [{kind: train}]\n",
     ["model.factory", "lines 3 and 5"]),
    ("empty-file", "", ["{file}", "empty"]),
    ("only-comments", "# a recipe, some day\n", ["{file}", "empty"]),
    ("not-utf8", b"name: caf\xe9\nmodel: {factory: small_cnn, input_shape: [1, 8, 8]}\nstages: [{kind: train}]\n",
     ["{file}", "not UTF-8", "0xe9", "line 1"]),
    ("utf16", "name: t\n".encode("utf-16"), ["{file}", "not UTF-8"]),
    ("a-list", "- name: t\n- stages: []\n", ["{file}", "YAML mapping", "list"]),
    ("a-scalar", "just some text\n", ["{file}", "YAML mapping"]),
    ("invalid-yaml", "name: t\nmodel: {factory: small_cnn\nstages: [\n", ["{file}", "invalid YAML", "line"]),
    ("two-documents", SMALL + "stages: [{kind: train}]\n---\nname: u\n", ["{file}", "invalid YAML", "line"]),
    ("python-tag", SMALL + "stages: [{kind: train}]\nx: !!python/object/apply:os.system [echo hi]\n",
     ["{file}", "invalid YAML", "line 5"]),
    ("alias-bomb-top-level", _bomb() + SMALL + "stages: [{kind: train}]\n", ["{file}", "aliases", "100,000"]),
    ("alias-bomb-in-model-kwargs",
     "name: t\nmodel:\n  factory: small_cnn\n  input_shape: [1, 8, 8]\n  kwargs:\n" + _bomb("    ")
     + "stages: [{kind: train}]\n", ["{file}", "aliases"]),
    ("recursive-alias", "name: t\nmodel: &m {factory: small_cnn, input_shape: [1, 8, 8], kwargs: {me: *m}}\n"
                        "stages: [{kind: train}]\n", ["{file}", "alias", "contains it"]),
    ("nested-too-deeply", SMALL + "stages: [{kind: train}]\nx: " + "[" * 5000 + "]" * 5000 + "\n",
     ["{file}", "nested too deeply"]),
    ("zero-stages", SMALL + "stages: []\n", ["stages: ", "at least one stage", "line 4"]),
    ("no-stages-key", SMALL, ["stages: ", "at least one stage"]),
]


# the cases also run through ``compress run`` (the same loader; the bombs hung there)
THROUGH_RUN = {"duplicate-key-in-stage", "empty-file", "not-utf8", "a-list", "alias-bomb-top-level",
               "alias-bomb-in-model-kwargs", "recursive-alias", "zero-stages"}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case, content, needles", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_recipe_file(tmp_path, command, case, content, needles):
    if command == "run" and case not in THROUGH_RUN:
        pytest.skip("validate covers it; run reads the recipe with the same loader")
    p = tmp_path / "recipe.yaml"
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    args = ["--out", str(tmp_path / "run")] if command == "run" else []
    t0 = time.monotonic()
    res = cli(command, str(p), *args, timeout=60)  # the alias bomb must not hang (it did: run never ended)
    assert time.monotonic() - t0 < 45
    _assert_input_error(res, *[n.replace("{file}", str(p)) for n in needles])
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_recipe_path_is_a_directory(tmp_path):
    _assert_input_error(cli("validate", str(tmp_path)), "recipe", "is a directory")


def test_recipe_path_too_long(tmp_path):
    _assert_input_error(cli("validate", str(tmp_path / ("a" * 5000))), "recipe", "File name too long")


def test_merge_keys_and_shared_anchors_are_not_duplicates(write_recipe):
    text = SMALL + (
        "stages:\n"
        "  - &t {kind: train, epochs: 1, optimizer: &o {name: sgd, lr: 0.1}}\n"
        "  - {<<: *t, kind: finetune, optimizer: *o}\n")
    res = cli("validate", str(write_recipe(text)))
    assert res.returncode == 0, res.stderr
    assert "2 stages: train, finetune" in res.stdout


# --- values the schema accepted but the code could not use, and --set paths -----------------------

# (id, --set arguments, needles)
BAD_VALUES = [
    ("seed-negative", ["seed=-1"], ["seed: ", "0 <= seed < 4294967", "got -1"]),
    ("seed-beyond-numpy", ["seed=4294967"], ["seed: ", "0 <= seed < 4294967"]),
    ("seed-huge", ["seed=99999999999999999999"], ["seed: "]),
    ("int-overflow", ["data.batch_size=1180591620717411303424"], ["data.batch_size", "too large"]),
    ("int-in-list-overflow", ["stages.6.batch_sizes=[1, 1099511627776]"], ["stages[6].batch_sizes", "too large"]),
    ("threads", ["stages.6.threads=1048576"], ["stages[6].threads"]),
    ("lr-inf", ["stages.0.optimizer.lr=.inf"], ["stages[0].optimizer.lr", "finite"]),
    ("lr-nan", ["stages.0.optimizer.lr=.nan"], ["stages[0].optimizer.lr", "finite"]),
    ("gate-nan", ["gates.max_accuracy_drop=.nan"], ["gates.max_accuracy_drop", "finite"]),
    ("nan-in-dict", ["stages.1.ratios={conv1: .nan}"], ["stages[1].ratios.conv1", "finite"]),
    ("limit-zero", ["data.limit_train=0"], ["data.limit_train"]),
    ("empty-batch-sizes", ["stages.6.batch_sizes=[]"], ["stages[6].batch_sizes"]),
    ("zero-stages", ["stages=[]"], ["stages: ", "at least one stage"]),
    ("set-through-int", ["seed.x=1"], ["seed.x", "seed is 0, not a mapping or a list"]),
    ("set-through-str", ["name.x.y=1"], ["name.x", "name is 'tiny'"]),
    ("set-through-stage-kind", ["stages.0.kind.x=1"], ["stages[0].kind.x", "not a mapping"]),
    ("set-name-into-list", ["stages.first.ratio=1"], ["stages.first", "is a list", "0 to 6"]),
    ("set-index-past-end", ["stages.99.ratio=0.1"], ["stages[99]", "no list element 99"]),
    ("set-index-into-mapping", ["model.0=1"], ["model.0", "unknown field"]),
    ("set-empty-name", ["stages..ratio=1"], ["--set", "empty field name"]),
    ("set-no-equals", ["seed"], ["--set", "PATH=VALUE"]),
    ("set-duplicate-key", ["model.kwargs={width: 8, width: 16}"], ["model.kwargs.width", "given twice"]),
]


@pytest.mark.parametrize("case, sets, needles", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_value(write_recipe, case, sets, needles):
    args = [a for s in sets for a in ("--set", s)]
    _assert_input_error(cli("validate", str(write_recipe(tiny_recipe())), *args), *needles)


def test_bad_value_in_the_file_names_its_line(write_recipe):
    r = tiny_recipe(seed=-1)
    text = _text(r)
    _assert_input_error(cli("validate", str(write_recipe(text))), "seed: ", f"(line {_line_of(text, 'seed:')})")


@pytest.mark.parametrize("sets, needles", [
    (["seed=-1"], ["seed: "]),                      # scikit-learn refused it after the run started
    (["seed=99999999999999999999"], ["seed: "]),    # OverflowError
    (["seed.x=1"], ["seed.x"]),
    (["name.x.y=1"], ["name.x"]),                   # TypeError: 'str' object does not support item assignment
], ids=["seed-negative", "seed-huge", "set-through-int", "set-through-str"])
def test_bad_value_run_refused_before_anything_runs(write_recipe, tmp_path, sets, needles):
    args = [a for s in sets for a in ("--set", s)]
    res = cli("run", str(write_recipe(tiny_recipe())), "--out", str(tmp_path / "run"), *args)
    _assert_input_error(res, *needles)
    assert not (tmp_path / "run").exists()


def test_largest_seed_is_usable():
    """The bound is exact: the largest seed gives per-stage seeds NumPy, scikit-learn and torch take."""
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    from compress.paths import stage_seed
    from compress.recipe import MAX_STAGES, SEED_LIMIT, validate_data

    seed = SEED_LIMIT - 1
    assert validate_data(tiny_recipe(seed=seed)).seed == seed
    for s in (seed, stage_seed(seed, MAX_STAGES - 1)):
        np.random.RandomState(s)
        torch.Generator().manual_seed(s * 100_003 + 10_000)  # lottery batches: stage seed * 100003 + epoch
        train_test_split(list(range(10)), random_state=s)


def test_set_paths_in_process():
    from compress.errors import InputError
    from compress.recipe import apply_overrides

    data = apply_overrides(tiny_recipe(), ["stages.-1.iters=5", "model.kwargs.width=4", "data.md5.a=b",
                                           "gates.max_accuracy_drop=2"])
    assert data["stages"][-1]["iters"] == 5 and data["model"]["kwargs"]["width"] == 4
    assert data["data"]["md5"] == {"a": "b"} and data["gates"]["max_accuracy_drop"] == 2
    numbered = {"name": "t", "model": {"kwargs": {1: "a"}}}
    assert apply_overrides(numbered, ["model.kwargs.1=b"])["model"]["kwargs"] == {1: "b"}
    assert apply_overrides(tiny_recipe(), ["name=not: yaml: at all"])["name"] == "not: yaml: at all"
    for bad in ["seed.x=1", "name.x.y=1", "stages.x=1", "stages.7=1", ".x=1", "device.0=1"]:
        with pytest.raises(InputError):
            apply_overrides(tiny_recipe(), [bad])


# --- stage order -----------------------------------------------------------------------------------

TRAIN = {"kind": "train", "epochs": 1}
EXPORT = {"kind": "export"}

# (id, stages, needles)
BAD_ORDERS = [
    ("prune-after-export", [TRAIN, EXPORT, {"kind": "prune"}],
     ["stages[2].kind", "a prune stage after the export stage (stages[1])", "move the export stage after it"]),
    ("finetune-after-export", [TRAIN, EXPORT, {"kind": "finetune", "epochs": 1}],
     ["stages[2].kind", "finetune", "export"]),
    ("train-after-export", [TRAIN, EXPORT, TRAIN], ["stages[2].kind", "a train stage after the export"]),
    ("sparsify-after-export", [TRAIN, EXPORT, {"kind": "benchmark"}, {"kind": "sparsify"}],
     ["stages[3].kind", "sparsify", "export"]),
    ("lottery-after-export-pt2", [TRAIN, {"kind": "export", "pt2": True},
                                  {"kind": "lottery", "rounds": 1, "train": {"iterations": 10}}],
     ["stages[2].kind", "lottery", "pt2"]),
    ("search-after-export", [TRAIN, EXPORT, {"kind": "search"}], ["stages[2].kind", "search", "export"]),
    ("finetune-after-tensorrt", [TRAIN, EXPORT, {"kind": "tensorrt", "optional": True},
                                 {"kind": "finetune", "epochs": 1}],
     ["stages[3].kind", "export"]),
    ("prune-after-lottery", [{"kind": "lottery", "rounds": 1, "train": {"iterations": 10}}, {"kind": "prune"}],
     ["stages[1].kind", "prune", "masks"]),
    ("prune-after-sparsify", [TRAIN, {"kind": "sparsify"}, {"kind": "finetune", "epochs": 1}, {"kind": "prune"}],
     ["stages[3].kind", "prune", "masks"]),
    ("search-after-sparsify", [TRAIN, {"kind": "sparsify"}, {"kind": "search"}], ["stages[2].kind", "masks"]),
    ("distill-without-teacher", [TRAIN, {"kind": "finetune", "distill": {}}],
     ["stages[1].distill", "teacher"]),
]


@pytest.mark.parametrize("case, stages, needles", BAD_ORDERS, ids=[c[0] for c in BAD_ORDERS])
def test_bad_stage_order(write_recipe, case, stages, needles):
    text = _text(tiny_recipe(stages=copy.deepcopy(stages)))
    _assert_input_error(cli("validate", str(write_recipe(text))), *needles, "(line ")


def test_bad_stage_order_run_refused_before_training(write_recipe, tmp_path):
    p = write_recipe(tiny_recipe(stages=[TRAIN, EXPORT, {"kind": "prune"}]))
    res = cli("run", str(p), "--out", str(tmp_path / "run"))
    _assert_input_error(res, "stages[2].kind", "export")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stages", [
    [TRAIN, {"kind": "prune"}, {"kind": "finetune", "distill": {}}, {"kind": "sparsify"},
     {"kind": "finetune", "epochs": 1}, EXPORT, {"kind": "benchmark"}, {"kind": "tensorrt", "optional": True}],
    [TRAIN, {"kind": "benchmark"}, EXPORT, {"kind": "benchmark"}],
    [TRAIN, {"kind": "search"}, {"kind": "sparsify"}, {"kind": "finetune", "distill": {}}, EXPORT],
    [{"kind": "lottery", "rounds": 1, "train": {"iterations": 10}}, {"kind": "finetune", "epochs": 1}, EXPORT],
    [EXPORT],
    [{"kind": "benchmark"}],
], ids=["full-chain", "benchmark-before-and-after-export", "search", "lottery", "export-only", "benchmark-only"])
def test_good_stage_orders_validate(stages):
    from compress.recipe import validate_data

    r = validate_data(tiny_recipe(stages=copy.deepcopy(stages)))
    assert [s.kind for s in r.stages] == [s["kind"] for s in stages]


def test_changes_model_is_declared_by_every_stage():
    """The order rule reads the stages' declarations; a new stage kind must think about it."""
    from compress.stages import STAGES

    expected = {"train": True, "finetune": True, "prune": True, "sparsify": True, "lottery": True,
                "search": True, "export": False, "benchmark": False, "tensorrt": False}
    got = {k: STAGES.get(k).config.model_construct().changes_model() for k in STAGES.names()}
    assert got == {k: expected[k] for k in got}


# --- compress schema --out -------------------------------------------------------------------------

def test_schema_out_directory(tmp_path):
    _assert_input_error(cli("schema", "--out", str(tmp_path)), "--out", "is a directory")


@pytest.mark.parametrize("under", ["afile/schema.json", "afile/deeper/schema.json"])
def test_schema_out_under_a_file(tmp_path, under):
    (tmp_path / "afile").write_text("x")
    _assert_input_error(cli("schema", "--out", str(tmp_path / under)), "--out", "is a file, not a directory")


def test_schema_out_name_too_long(tmp_path):
    _assert_input_error(cli("schema", "--out", str(tmp_path / ("a" * 5000))), "--out", "File name too long")


def test_schema_out_writes_json(tmp_path):
    import json

    out = tmp_path / "new" / "schema.json"
    res = cli("schema", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["properties"]["seed"]["exclusiveMaximum"] == 4294967


@pytest.mark.parametrize("code, exit_code", [(errno.EROFS, 4), (errno.EACCES, 4), (errno.ENOSPC, 4),
                                             (errno.ENAMETOOLONG, 2)])
def test_schema_out_os_errors(tmp_path, monkeypatch, code, exit_code):
    """Read-only file system, permission denied, disk full: the machine refused (4); a bad name: 2.
    (The tests may run as root, where chmod cannot make a read-only place: the write fails here.)"""
    import os

    from typer.testing import CliRunner

    import compress.io
    from compress.cli import app

    def refuse(path, text):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(compress.io, "atomic_write_text", refuse)
    res = CliRunner().invoke(app, ["schema", "--out", str(tmp_path / "schema.json")])
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output
    assert "schema.json" in res.output and os.strerror(code) in res.output


# --- every shipped recipe still validates ----------------------------------------------------------

@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_validates(recipe):
    # recipes whose data lives under a root (MNIST, CIFAR-10) get the schema check only: their data is
    # not in the repository, and the pre-run checks refuse a missing data root by design
    needs_files = yaml.safe_load(recipe.read_text()).get("data", {}).get("root") is not None
    res = cli("validate", *(["--no-preflight"] if needs_files else []), str(recipe))
    assert res.returncode == 0, res.stderr
    assert "ok (" in res.stdout
