"""INT8 post-training quantization of an exported ONNX model into explicit Q/DQ form.

TensorRT 10.12+ / 11 build strongly typed networks, so int8 can only come from
QuantizeLinear/DequantizeLinear nodes in the ONNX graph (TensorRT's int8 calibrator API is
deprecated since 10.1). ONNX Runtime's static quantizer writes such a graph from calibration
batches; the settings below are the ones TensorRT's explicit quantization accepts:

- QDQ format, int8 for weights and activations, symmetric ranges (zero point 0: TensorRT rejects
  other zero points for int8),
- per-channel weight scales (axis = output channels), which keep accuracy close to fp32,
- only the inputs/outputs of Conv, Gemm and MatMul are quantized (the layers with weights; the
  other ops run in the build's float precision).

A 2:4 weight stays 2:4 after this: with zero point 0 a zero weight quantizes to exactly 0, so
``check_sparsity`` (which follows DequantizeLinear back to the int8 initializer) still sees the
pattern and TensorRT can pick its sparse int8 kernels.

Calibration feeds every graph input, by position as the export wrote them (a tensor, a tuple or a
dict of inputs, e.g. a BERT's ``input_ids`` + ``attention_mask``), each cast to the graph's own
element type. Only float activations get ranges: integer inputs (token ids, masks) reach the
graph's Gather/Cast/Add nodes, which are not quantized, so they stay integer; the int8 report names
them (``unquantized_inputs``).

The same file runs on ONNX Runtime's CPU provider (QDQ pairs become int8 kernels there), which is
how the tests and the ``onnxruntime_int8`` benchmark backend measure it without a GPU.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .inputs import read_inputs
from .onnx_io import graph_feed, save_onnx

# recipe name -> ONNX Runtime's CalibrationMethod member
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def unquantized_inputs(path: str | Path) -> dict[str, str]:
    """The graph inputs int8 does not apply to (integer or boolean: token ids, attention masks), by
    name, with their element type: they stay as they are, and the layers after them that are
    quantized read float activations computed from them."""
    return {s.name: str(s.dtype) for s in read_inputs(path) if not np.issubdtype(s.dtype, np.floating)}


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over a list of prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of the protocol; one pass is all we use
        pass


@contextlib.contextmanager
def _quiet():
    """The quantizer prints histograms to stdout and advice through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def export_int8_onnx(src: str | Path, dst: str | Path, calibration: Iterable,
                     method: str = "minmax", per_channel: bool = True) -> Path:
    """Write ``dst``: ``src`` with int8 Q/DQ around every Conv/Gemm/MatMul, activation ranges from
    ``calibration`` (batches of model inputs: an array or tensor for a one-input model, a tuple or
    dict of them for several; see :func:`~compress.deploy.onnx_io.graph_feed`). Atomic: ``dst`` appears complete or not
    at all; the weights go to ``<dst>.data`` when ``src`` keeps its own weights externally."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static


    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r} (known: {', '.join(CALIBRATION_METHODS)})")
    src, dst = Path(src), Path(dst)
    specs = read_inputs(src)
    feeds = [graph_feed(specs, inputs) for inputs in calibration]
    if not feeds:
        raise ValueError("int8 calibration needs at least one batch")
    external = (src.parent / (src.name + ".data")).exists()
    calib = getattr(CalibrationMethod, CALIBRATION_METHODS[method])
    tmpdir = tempfile.mkdtemp(dir=dst.parent, prefix=".int8-")
    try:
        tmp = Path(tmpdir) / dst.name
        with _quiet():
            quantize_static(str(src), str(tmp), _Batches(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=calib,
                            use_external_data_format=external,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "QuantizeBias": False})
        proto = onnx.load(str(tmp))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return save_onnx(proto, dst, external or None)


def quantized_nodes(path: str | Path) -> dict[str, int]:
    """How many Conv/Gemm/MatMul nodes read a DequantizeLinear output (run in int8 by TensorRT
    and ONNX Runtime), and how many such nodes the graph has in all."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    ops = [n for n in g.node if n.op_type in QUANTIZED_OPS]
    return {"int8_layers": sum(1 for n in ops if n.input and n.input[0] in dq_out), "layers": len(ops)}
