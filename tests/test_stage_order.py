"""Stage order is checked once, when the recipe is loaded: an impossible order is an input error
(exit 2, one line naming the stage field, no traceback) at ``compress validate`` — and so before
``compress run`` trains anything — not a failure after the training stages.

The rules come from each stage's declarations (StageConfig.changes_structure / needs / provides /
conflicts) and the gates' needs; see compress/recipe.py (Recipe._check_stage_order)."""
from __future__ import annotations

import pytest

from conftest import cli, tiny_recipe

TRAIN = {"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}}
PRUNE = {"kind": "prune", "importance": "l2", "ratio": 0.5, "scope": "global"}
SPARSIFY = {"kind": "sparsify", "pattern": "2:4"}
LOTTERY = {"kind": "lottery", "rounds": 1, "train": {"iterations": 10}}
FINETUNE = {"kind": "finetune", "epochs": 1}
DISTILL = {"kind": "finetune", "epochs": 1, "distill": {}}
EXPORT = {"kind": "export"}
EXPORT_INT8 = {"kind": "export", "onnx": {"int8": True}}
BENCH = {"kind": "benchmark", "batch_sizes": [1]}
BENCH_INT8 = {"kind": "benchmark", "batch_sizes": [1], "backends": ["onnxruntime_int8"]}

# (id, stages, gates, the field the error names, words the message must hold)
INVALID = [
    ("distill-without-structure-change", [TRAIN, DISTILL], {}, "stages[1].distill", ["teacher"]),
    ("distill-before-prune", [TRAIN, DISTILL, PRUNE], {}, "stages[1].distill", ["teacher"]),
    ("ort-int8-without-export", [TRAIN, BENCH_INT8], {}, "stages[1].backends", ["int8: true"]),
    ("ort-int8-without-int8-export", [TRAIN, EXPORT, {**BENCH_INT8, "backends": ["onnxruntime", "onnxruntime_int8"]}],
     {}, "stages[2].backends", ["int8: true"]),
    ("ort-int8-before-its-export", [TRAIN, BENCH_INT8, EXPORT_INT8], {}, "stages[1].backends", ["int8: true"]),
    ("benchmark-tensorrt-int8-without-int8-export", [TRAIN, {**BENCH, "backends": ["tensorrt"], "precision": "int8"}],
     {}, "stages[1].precision", ["int8: true"]),
    ("tensorrt-without-export", [TRAIN, {"kind": "tensorrt"}], {}, "stages[1].kind", ["export stage"]),
    ("tensorrt-before-export", [TRAIN, {"kind": "tensorrt"}, EXPORT], {}, "stages[1].kind", ["export stage"]),
    ("tensorrt-int8-without-int8-export", [TRAIN, EXPORT, {"kind": "tensorrt", "precision": "int8"}], {},
     "stages[2].precision", ["int8: true"]),
    ("prune-after-sparsify", [TRAIN, SPARSIFY, PRUNE], {}, "stages[2].kind", ["masks", "prune before sparsify"]),
    ("prune-after-lottery", [TRAIN, LOTTERY, FINETUNE, PRUNE], {}, "stages[3].kind", ["masks"]),
    ("parity-gate-without-export", [TRAIN, PRUNE, BENCH], {"max_parity_error": 1e-4}, "gates.max_parity_error",
     ["export stage"]),
    ("int8-gate-without-int8-export", [TRAIN, EXPORT], {"max_int8_accuracy_drop": 1.0},
     "gates.max_int8_accuracy_drop", ["int8: true"]),
]

VALID = [
    ("full-chain-with-int8", [TRAIN, PRUNE, {**DISTILL, "distill": {"alpha": 0.7}}, SPARSIFY, FINETUNE, EXPORT_INT8,
                              BENCH_INT8], {"max_parity_error": 1e-4, "max_int8_accuracy_drop": 2.0}),
    ("benchmark-exports-its-own-onnx", [TRAIN, PRUNE, BENCH], {}),
    ("early-bird-prune-records-the-teacher", [{"kind": "prune", "when": "early_bird", "ratio": 0.5}, DISTILL], {}),
    ("distill-after-sparsify", [TRAIN, SPARSIFY, DISTILL], {}),
    ("distill-after-lottery", [TRAIN, LOTTERY, DISTILL], {}),
    ("prune-then-sparsify", [TRAIN, PRUNE, SPARSIFY], {}),
    ("export-then-tensorrt", [TRAIN, EXPORT, {"kind": "tensorrt", "optional": True}], {"max_parity_error": 1e-4}),
    ("tensorrt-int8-after-int8-export", [TRAIN, EXPORT_INT8, {"kind": "tensorrt", "precision": "best", "optional": True}],
     {}),
]


def _recipe(stages, gates) -> dict:
    return tiny_recipe(stages=[dict(s) for s in stages], gates=dict(gates))


@pytest.mark.parametrize("stages, gates, field, words",
                         [pytest.param(*row[1:], id=row[0]) for row in INVALID])
def test_impossible_order_is_an_input_error_at_validate(write_recipe, stages, gates, field, words):
    res = cli("validate", str(write_recipe(_recipe(stages, gates))))
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert err[0].removeprefix("error: ").startswith(f"{field}: "), err[0]  # the field first
    for w in words:
        assert w in err[0], (w, err[0])
    if field.startswith("stages["):
        assert "(line " in err[0], err[0]  # points at the YAML line of the stage


@pytest.mark.parametrize("stages, gates", [pytest.param(*row[1:], id=row[0]) for row in VALID])
def test_possible_orders_validate(write_recipe, stages, gates):
    res = cli("validate", str(write_recipe(_recipe(stages, gates))))
    assert res.returncode == 0, res.stderr
    assert f"({len(stages)} stages" in res.stdout


def test_run_refuses_an_impossible_order_before_training(write_recipe, tmp_path):
    out = tmp_path / "run"
    res = cli("run", str(write_recipe(_recipe([TRAIN, DISTILL], {}))), "--out", str(out), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "stages[1].distill" in res.stderr
    assert not out.exists(), "nothing may be written (or trained) for a recipe that cannot run"


def test_order_errors_come_from_the_loader():
    """The same check without a subprocess: the InputError carries the field."""
    from compress.errors import InputError
    from compress.recipe import validate_data

    for name, stages, gates, field, _ in INVALID:
        with pytest.raises(InputError) as ei:
            validate_data(_recipe(stages, gates))
        assert ei.value.field == field, name
    for _, stages, gates in VALID:
        validate_data(_recipe(stages, gates))


def _tensorrt_runs_here() -> bool:
    from compress.deploy.tensorrt import require_tensorrt
    from compress.deploy.timing import BackendUnavailable

    try:
        require_tensorrt()
    except BackendUnavailable:
        return False
    return True


@pytest.mark.skipif(_tensorrt_runs_here(), reason="checks the refusal on machines without TensorRT or a GPU")
@pytest.mark.parametrize("stage, field", [
    ({"kind": "tensorrt"}, "stages[2].kind"),
    ({**BENCH, "backends": ["onnxruntime", "tensorrt"]}, "stages[2].backends"),
])
def test_a_required_backend_missing_here_is_refused_before_training(write_recipe, stage, field):
    """A stage this machine cannot run is an input error when the recipe is loaded (not after the
    training stages); ``optional: true`` makes it a skip instead."""
    res = cli("validate", str(write_recipe(_recipe([TRAIN, EXPORT, stage], {}))))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {field}: ") and "compress-models[tensorrt]" in line and "optional: true" in line
    res = cli("validate", str(write_recipe(_recipe([TRAIN, EXPORT, {**stage, "optional": True}], {}))))
    assert res.returncode == 0, res.stderr
