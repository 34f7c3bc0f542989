"""The names of every deployment file, in one place.

The export stage writes the compressed model as ``model.onnx`` in the run directory and the dense
reference as ``dense.onnx`` in its stage directory. Precision variants sit beside their fp32 file
with the precision before the extension — ``model.fp16.onnx``, ``model.int8.onnx``,
``dense.int8.onnx`` — so any consumer finds them from the fp32 path alone.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

COMPRESSED_ONNX = "model.onnx"
DENSE_ONNX = "dense.onnx"
PT2 = "model.pt2"
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data for models over protobuf's limit
PRECISIONS = ("fp32", "fp16", "int8")


def base_stem(path: str | Path) -> str:
    """``model`` for ``model.onnx``, ``model.fp16.onnx`` and ``model.int8.onnx`` alike."""
    stem = Path(path).stem
    for p in PRECISIONS[1:]:
        stem = stem.removesuffix("." + p)
    return stem


def precision_of(path: str | Path) -> str:
    stem = Path(path).stem
    return next((p for p in PRECISIONS[1:] if stem.endswith("." + p)), "fp32")


def onnx_sibling(path: str | Path, precision: str) -> Path:
    """The file of ``precision`` beside ``path`` (``fp32`` gives the base file)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    path = Path(path)
    suffix = "" if precision == "fp32" else "." + precision
    return path.with_name(base_stem(path) + suffix + ".onnx")


def int8_onnx_beside(path: str | Path) -> Path:
    """The int8 Q/DQ file the export stage writes beside ``path``; an InputError naming the recipe
    switch when it is not there, since only the export stage has the calibration data to make it."""
    path = Path(path)
    q = onnx_sibling(path, "int8")
    if not q.exists():
        raise InputError(f"int8 needs {q.name} beside {path.name}: add 'int8: true' to the export stage's "
                         "onnx block (it calibrates on training batches)", field="export.onnx.int8")
    return q


def engine_name(onnx_path: str | Path, precision: str, batch_size: int) -> str:
    """The cached engine a benchmark backend builds for one ONNX file, precision and batch size."""
    return f"{Path(onnx_path).stem}.{precision}.b{batch_size}"
