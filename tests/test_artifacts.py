"""compress.stages.artifacts: what stages hand on survives result.json (and so --resume)."""
from __future__ import annotations

import json

from compress.io import atomic_write_json
from compress.stages.artifacts import Artifacts, OnnxFiles


def _full() -> Artifacts:
    return Artifacts(
        teacher="dense",
        onnx=OnnxFiles(fp32="model.onnx", fp16="model.fp16.onnx", int8="model.int8.onnx",
                       dense_fp32="stages/05-export/dense.onnx", dense_fp16="stages/05-export/dense.fp16.onnx",
                       dense_int8="stages/05-export/dense.int8.onnx", external_data="model.onnx.data", pt2="model.pt2"),
        engines="tensorrt/engines.json")


def test_round_trip_through_json(tmp_path):
    a = _full()
    atomic_write_json(tmp_path / "result.json", {"artifacts": a.to_dict()})
    back = Artifacts.from_dict(json.loads((tmp_path / "result.json").read_text())["artifacts"])
    assert back == a
    assert back.onnx.compressed("int8") == "model.int8.onnx" and back.onnx.dense("fp16") == "stages/05-export/dense.fp16.onnx"


def test_to_dict_is_plain_json():
    d = _full().to_dict()
    assert d["teacher"] == "dense" and d["engines"] == "tensorrt/engines.json"
    assert d["onnx"]["fp32"] == "model.onnx" and d["onnx"]["pt2"] == "model.pt2"
    assert json.loads(json.dumps(d)) == d


def test_empty_and_partial_records():
    assert Artifacts.from_dict(None) == Artifacts() == Artifacts.from_dict({})
    assert Artifacts.from_dict(Artifacts().to_dict()) == Artifacts()
    # a record from before an export stage ran, and one with a field this version does not know
    a = Artifacts.from_dict({"teacher": "dense", "onnx": None})
    assert a.teacher == "dense" and a.onnx == OnnxFiles() and a.engines is None
    b = Artifacts.from_dict({"onnx": {"fp32": "model.onnx", "bf16": "model.bf16.onnx"}, "future": 1})
    assert b.onnx == OnnxFiles(fp32="model.onnx") and b.teacher is None


def test_from_dict_does_not_modify_its_input():
    d = _full().to_dict()
    before = json.dumps(d, sort_keys=True)
    Artifacts.from_dict(d)
    assert json.dumps(d, sort_keys=True) == before
