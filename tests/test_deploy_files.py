"""compress.deploy.files: the names of the deployment files, found from the fp32 path alone."""
from __future__ import annotations

from pathlib import Path

import pytest

from compress.deploy.files import (COMPRESSED_ONNX, DENSE_ONNX, base_stem, engine_name, int8_onnx_beside,
                                   onnx_sibling, precision_of)
from compress.errors import InputError


@pytest.mark.parametrize("path, stem, precision", [
    ("model.onnx", "model", "fp32"),
    ("model.fp16.onnx", "model", "fp16"),
    ("model.int8.onnx", "model", "int8"),
    ("/runs/a/stages/05-export/dense.int8.onnx", "dense", "int8"),
    (Path("run") / "dense.fp16.onnx", "dense", "fp16"),
    ("my.model.onnx", "my.model", "fp32"),        # dots in the base name survive
    ("model.fp16x.onnx", "model.fp16x", "fp32"),  # only an exact precision suffix counts
])
def test_base_stem_and_precision_of(path, stem, precision):
    assert base_stem(path) == stem
    assert precision_of(path) == precision


def test_onnx_sibling_from_any_precision_to_any_precision(tmp_path):
    for start in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        p = tmp_path / start
        assert onnx_sibling(p, "fp32") == tmp_path / "model.onnx"
        assert onnx_sibling(p, "fp16") == tmp_path / "model.fp16.onnx"
        assert onnx_sibling(str(p), "int8") == tmp_path / "model.int8.onnx"
    assert onnx_sibling(DENSE_ONNX, "int8") == Path("dense.int8.onnx")
    assert onnx_sibling(COMPRESSED_ONNX, "fp32") == Path(COMPRESSED_ONNX)
    with pytest.raises(ValueError, match="bf16"):
        onnx_sibling("model.onnx", "bf16")


def test_int8_onnx_beside_names_the_recipe_switch_when_missing(tmp_path):
    fp32 = tmp_path / "model.onnx"
    fp32.write_bytes(b"")
    with pytest.raises(InputError) as ei:
        int8_onnx_beside(fp32)
    assert ei.value.field == "export.onnx.int8"
    assert "model.int8.onnx" in str(ei.value) and "int8: true" in str(ei.value)
    assert str(ei.value).startswith("export.onnx.int8: ")  # one line, field first

    q = tmp_path / "model.int8.onnx"
    q.write_bytes(b"")
    assert int8_onnx_beside(fp32) == q
    assert int8_onnx_beside(tmp_path / "model.fp16.onnx") == q  # from any sibling
    assert int8_onnx_beside(q) == q


def test_engine_name():
    assert engine_name("/run/model.onnx", "fp16", 8) == "model.fp16.b8"
    assert engine_name("dense.onnx", "int8", 1) == "dense.int8.b1"
