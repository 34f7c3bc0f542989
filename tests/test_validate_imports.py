"""``compress validate`` (and a recipe that fails validation) reads every stage's Config but runs
nothing: it must not import the libraries only a run needs. Torch-Pruning alone pulls timm ->
torchvision -> torch._dynamo where timm is installed (seconds). Checked in a fresh interpreter
through the real command line, against what that interpreter loads before compress does."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, tiny_recipe

# imported by the stages that run them (pruning, ONNX, int8, Hugging Face models, the search)
RUN_ONLY = ("torch_pruning", "timm", "torchvision", "onnx", "onnxruntime", "onnxscript", "transformers", "optuna")

_PROBE = """
import json, runpy, sys
heavy = {heavy!r}
before = {{m for m in heavy if m in sys.modules}}
sys.argv = ["compress", *{args!r}]
try:
    runpy.run_module("compress", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
print(json.dumps({{"code": code, "loaded": sorted(m for m in heavy if m in sys.modules and m not in before)}}),
      file=sys.stderr)
"""


def _validate(*args: str) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=RUN_ONLY, args=list(args))], env=env,
                         capture_output=True, text=True, timeout=300)
    report = json.loads(res.stderr.strip().splitlines()[-1])
    return report["code"], report["loaded"], res.stdout + res.stderr


def test_validate_imports_no_run_only_library(write_recipe):
    r = tiny_recipe()
    # prune and search (criteria names), export with int8, the int8 and TensorRT consumers; every
    # stage module is imported either way (compress.stages registers them all)
    r["stages"][5]["onnx"]["int8"] = True
    r["stages"][6]["backends"] = ["onnxruntime", "onnxruntime_int8"]
    r["stages"].insert(1, {"kind": "search", "importance": "taylor", "budget_metric": "macs", "budget": 0.5,
                           "apply": False})
    r["stages"].append({"kind": "tensorrt", "precision": "int8", "optional": True})
    code, loaded, out = _validate("validate", str(write_recipe(r)))
    assert code == 0, out
    assert "ok (9 stages" in out
    assert loaded == [], f"validate imported {loaded}"


def test_a_bad_criterion_is_refused_without_importing_torch_pruning(write_recipe):
    r = tiny_recipe()
    r["stages"][1]["importance"] = "l3"
    code, loaded, out = _validate("validate", str(write_recipe(r)))
    assert code == 2 and "Traceback" not in out
    assert "stages[1].importance" in out and "unknown criterion 'l3'" in out and "taylor" in out
    assert loaded == []
