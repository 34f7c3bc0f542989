"""ONNX export, ONNX Runtime sessions and parity checks, and the 2:4 check on ONNX initializers."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .inputs import InputSpec, read_inputs
from ..example_inputs import example_input
from ..io import temp_name
from ..metrics import call_model, logits_of


class _LogitsOnly(nn.Module):
    """Export wrapper: HF models return output objects; ONNX wants a tensor. ``names`` (dict
    inputs) turns the positional ONNX inputs back into the model's keyword arguments."""

    def __init__(self, model: nn.Module, names: list[str] | None = None):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        if self.names is not None:
            return logits_of(self.model(**dict(zip(self.names, args))))
        return logits_of(self.model(*args))


def input_arrays(inputs) -> list[tuple[str | None, torch.Tensor]]:
    """A batch's inputs as (name, tensor) pairs in ONNX input order: a tensor -> ``input``; a
    tuple -> ``input_0``, ``input_1``...; a dict -> its keys."""
    if isinstance(inputs, torch.Tensor):
        return [("input", inputs)]
    if isinstance(inputs, Mapping):
        return [(str(k), v) for k, v in inputs.items()]
    return [(f"input_{i}", v) for i, v in enumerate(inputs)]


def graph_feed(specs: Sequence[InputSpec], inputs) -> dict[str, np.ndarray]:
    """ONNX Runtime's feed for one batch of the graph inputs ``specs``
    (:func:`~compress.deploy.inputs.read_inputs`). ``inputs``: an array or tensor (one-input model), a
    tuple/list of them or a dict (several inputs); a dict keyed by the graph's input names is matched
    by name, anything else by position (the order :func:`input_arrays` gives them for export). Each is
    cast to its graph input's element type (int64 token ids stay int64, float inputs become float32).
    Parity, ONNX metrics and int8 calibration all feed through here."""
    names = [s.name for s in specs]
    if isinstance(inputs, Mapping) and set(map(str, inputs)) == set(names):
        parts = [inputs[n] for n in names]  # the graph's names: matched by name, whatever the dict's order
    else:
        parts = [inputs] if isinstance(inputs, np.ndarray) else [a for _, a in input_arrays(inputs)]
    if len(parts) != len(specs):
        raise ValueError(f"a batch has {len(parts)} input(s); the ONNX graph takes "
                         f"{len(specs)} ({', '.join(names)})")
    feed = {}
    for spec, a in zip(specs, parts):
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        feed[spec.name] = np.ascontiguousarray(a, dtype=spec.dtype)
    return feed


def add_metadata(proto, metadata: dict | None) -> None:
    """``metadata_props`` entries (values as JSON unless already strings): whoever serves the file
    reads e.g. ``compress.preprocess`` to know the input contract."""
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


EXPORTERS = ("dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes opset 18+; asked for less, it writes 18 anyway
EXPORT_CHECK_TOLERANCE = 1e-4  # relative to the largest logit (fp32 rounding grows with the values)


@dataclass
class OnnxExport:
    """What :func:`onnx_export` wrote: ``exporter`` is the exporter that wrote the file,
    ``opset`` the default-domain opset read back from it, ``fallback`` why the first exporter
    tried was not used (None when it was), ``check_error`` the max |torch - ONNX Runtime| on the
    example batch and ``check_scale`` the largest |logit| there."""

    path: Path
    exporter: str
    opset: int
    requested: str
    fallback: str | None = None
    check_error: float | None = None
    check_scale: float | None = None

    def metrics(self) -> dict:
        out = {"exporter": self.exporter, "exporter_requested": self.requested, "opset": self.opset}
        if self.fallback:
            out["export_fallback"] = self.fallback
        return out


def written_opset(path_or_proto) -> int:
    """The default-domain (``ai.onnx``) opset an ONNX file or proto declares."""
    import onnx

    proto = path_or_proto if hasattr(path_or_proto, "opset_import") else onnx.load(str(path_or_proto),
                                                                                   load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:240]}" if lines else type(exc).__name__


def _run_exporter(exporter: str, wrapped: nn.Module, tensors: tuple, names: list[str], dest: Path, opset: int,
                  dynamic_batch: bool) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            # forward(*args): one spec per positional input, all sharing the batch axis
            dyn = {"args": tuple({0: batch} for _ in tensors)} if dynamic_batch else None
            torch.onnx.export(wrapped, tensors, str(dest), opset_version=max(opset, DYNAMO_MIN_OPSET),
                              dynamo=True, input_names=names, output_names=["logits"], dynamic_shapes=dyn)
        else:
            axes = {**{n: {0: "batch"} for n in names}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(wrapped, tensors, str(dest), opset_version=opset, dynamo=False,
                              input_names=names, output_names=["logits"], dynamic_axes=axes,
                              do_constant_folding=True)


def _check_file(path: Path, wrapped: nn.Module, tensors: tuple) -> tuple[float, float]:
    """(max |torch - ONNX Runtime|, max |torch logit|) on the example inputs."""
    with torch.no_grad():
        ref = wrapped(*tensors).float().numpy()
    sess = ort_session(path)
    got = sess.run(None, graph_feed(read_inputs(path), tensors))[0].astype(np.float32)
    if got.shape != ref.shape:
        return float("inf"), float(np.abs(ref).max(initial=0.0))
    return float(np.abs(ref - got).max(initial=0.0)), float(np.abs(ref).max(initial=0.0))


def onnx_export(model: nn.Module, input_shape, path: str | Path, opset: int = 17, dynamic_batch: bool = True,
                exporter: str = "auto", external_data: bool | None = None, batch: int = 1,
                example=None, metadata: dict | None = None) -> OnnxExport:
    """Export to ``path`` atomically and say how: :class:`OnnxExport`.

    ``exporter``: ``auto`` (default) and ``dynamo`` try ``torch.onnx.export(..., dynamo=True)``
    first, ``torchscript`` the TorchScript exporter first. The file of the first exporter that
    exports *and* matches torch on the example batch (max error <= 1e-4 of the largest logit) is
    kept; otherwise the other exporter is tried, and the reason is reported in ``fallback``. When
    both export but neither matches, the closer file is kept (the export stage gates on parity with
    real inputs); when neither exports, an :class:`InputError` names both reasons.

    ``example``: a real batch's inputs (a tensor, a tuple or a dict of tensors: ONNX inputs
    ``input``, ``input_0``..., or the dict's keys); default
    :func:`compress.example_inputs.example_input` at ``input_shape``, so token-id models get
    integer ids. The dynamo exporter writes opset >= 18: the opset actually written is read back
    into ``OnnxExport.opset``. ``metadata`` goes into the file's ``metadata_props``.
    ``external_data`` defaults to on for models over 1.5 GB (the 2 GB protobuf limit)."""
    import onnx
    from collections.abc import Mapping

    if exporter not in ("auto", *EXPORTERS):
        raise ValueError(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    if example is None:
        # batch >= 2 with a dynamic batch: torch.export specialises a size-1 axis to a constant
        example = example_input(model, input_shape, max(batch, 2) if dynamic_batch else batch)
    pairs = [(n, t.detach().cpu()) for n, t in input_arrays(example)]
    names = [n for n, _ in pairs]
    tensors = tuple(t for _, t in pairs)
    wrapped = _LogitsOnly(model, names if isinstance(example, Mapping) else None).eval()
    order = ["torchscript", "dynamo"] if exporter == "torchscript" else ["dynamo", "torchscript"]
    tmpdir = tempfile.mkdtemp(dir=path.parent, prefix=".onnx-")
    reasons, best = [], None  # best: (error / scale, exporter, file, error, scale)
    try:
        for name in order:
            dest = Path(tmpdir) / f"{name}-{path.name}"
            try:
                _run_exporter(name, wrapped, tensors, names, dest, opset, dynamic_batch)
                err, scale = _check_file(dest, wrapped, tensors)
            except Exception as exc:  # exporters raise many types (SymbolicValueError, UserError, ...)
                reasons.append(f"{name} exporter failed ({_one_line(exc)})")
                continue
            rel = err / max(1.0, scale)
            if best is None or rel < best[0]:
                best = (rel, name, dest, err, scale)
            if rel <= EXPORT_CHECK_TOLERANCE:
                break
            reasons.append(f"{name} export does not match torch (max error {err:.3g}, largest logit {scale:.3g})")
        if best is None:
            raise InputError("neither ONNX exporter can export this model: " + "; ".join(reasons), field="model")
        _, name, dest, err, scale = best
        proto = onnx.load(str(dest))
        add_metadata(proto, metadata)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    fallback = "; ".join(reasons) + f"; used the {name} exporter" if name != order[0] or reasons else None
    saved = save_onnx(proto, path, external_data)
    return OnnxExport(saved, name, written_opset(proto), exporter, fallback, err, scale)


def export_onnx(model: nn.Module, input_shape, path: str | Path, opset: int = 17, dynamic_batch: bool = True,
                exporter: str = "auto", external_data: bool | None = None, batch: int = 1,
                example=None, metadata: dict | None = None) -> Path:
    """:func:`onnx_export` returning only the path written (``model.onnx``)."""
    return onnx_export(model, input_shape, path, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter,
                       external_data=external_data, batch=batch, example=example, metadata=metadata).path


EXTERNAL_DATA_OVER = 1_500_000_000  # bytes of initializers: protobuf's hard limit is 2 GB


def save_onnx(proto, path: str | Path, external_data: bool | None = None) -> Path:
    """Check and write ``proto`` to ``path`` atomically. ``external_data`` (default: on above
    1.5 GB) puts the weights in ``<name>.data`` beside it, written before the graph, so a
    ``model.onnx`` that exists always has its weights."""
    import onnx

    path = Path(path)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    use_external = external_data if external_data is not None else size > EXTERNAL_DATA_OVER
    data_name = path.name + ".data"
    tmpdir = tempfile.mkdtemp(dir=path.parent, prefix=".onnx-")
    tmp = Path(tmpdir) / path.name
    try:
        if use_external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name)
        else:
            onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp))  # by path: the checker finds the external data beside it
        if use_external:
            os.replace(Path(tmpdir) / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            (path.parent / data_name).unlink()  # stale data from an earlier external-data export
        os.replace(tmp, path)
    finally:
        for f in Path(tmpdir).glob("*"):
            f.unlink()
        os.rmdir(tmpdir)
    return path


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or an input nobody produces: leave for the checker
            ordered += rest
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def export_fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """Half-precision copy of an ONNX model for GPU engines (TensorRT strongly-typed builds take
    their precision from these types). Inputs and outputs stay float32 (Cast nodes at the edges),
    so callers feed the same arrays as to the fp32 model."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    proto = onnx.load(str(src))
    half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    _topological_sort(half.graph)  # the converter appends its input Casts after their consumers
    external = (src.parent / (src.name + ".data")).exists() or None  # follow the fp32 file's layout
    return save_onnx(half, dst, external)


def export_pt2(model: nn.Module, input_shape, path: str | Path, dynamic_batch: bool = True) -> Path:
    """``torch.export`` program saved with ``torch.export.save`` (atomically), for serving with
    PyTorch: ``torch.export.load(path).module()(x)`` returns the logits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _LogitsOnly(model.eval().cpu()).eval()
    example = example_input(model, input_shape, 2)  # batch 2: a size-1 example would be specialised
    # forward(*args): the spec names ``args``, one entry per positional input
    dyn = {"args": ({0: torch.export.Dim("batch", min=1, max=4096)},)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapped, (example,), dynamic_shapes=dyn)
    tmp = temp_name(path, ".pt2")  # created by torch.export.save: the umask applies (mkstemp: 0600)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def ort_session(path: str | Path, threads: int = 1, sequential: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_logits(model: nn.Module, x) -> np.ndarray:
    """The model's logits on ``x`` (a tensor, tuple or dict of inputs; eval mode, CPU): the
    reference ONNX files are compared with."""
    from ..metrics import to_device

    with torch.no_grad():
        return logits_of(call_model(model.eval().cpu(), to_device(x, "cpu"))).numpy()


def parity(model: nn.Module, onnx_path: str | Path, x: torch.Tensor, threads: int = 1,
           reference: np.ndarray | None = None) -> dict[str, float]:
    """Compare torch and ONNX Runtime on real inputs ``x``: max/mean abs error, the max error
    relative to the largest logit (``parity_max_rel_error`` = max abs error / max(1, max |logit|):
    equal to the absolute error while logits stay within +-1), top-1 agreement.
    ``reference`` (``torch_logits(model, x)``) saves the torch pass when several files are compared."""
    ref = torch_logits(model, x) if reference is None else reference
    sess = ort_session(onnx_path, threads)
    got = sess.run(None, graph_feed(read_inputs(onnx_path), x))[0].astype(np.float32)
    err = np.abs(ref - got)
    scale = float(np.abs(ref).max(initial=0.0))
    return {
        "parity_max_abs_error": float(err.max()),
        # fp32 rounding grows with the values: a random-init net whose BN statistics do not fit
        # its weights (inception_v3 with init_weights=True) reaches logits of 1e9, where one float
        # ulp is 128 and no exporter matches to 1e-4 absolute. The gate reads this one.
        "parity_max_rel_error": float(err.max()) / max(1.0, scale),
        "parity_logit_scale": scale,
        "parity_mean_abs_error": float(err.mean()),
        "parity_top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean() * 100.0),  # classes: axis 1
        "parity_samples": int(len(ref)),
    }


def onnx_metrics(onnx_path: str | Path, loader, meter, threads: int = 1) -> dict[str, float]:
    """The task's metrics (``meter``: e.g. ``objective.meter()``) of an ONNX model over ``loader``'s
    ``(inputs, targets)`` batches with ONNX Runtime's CPU provider: what the deployed file scores."""
    sess, specs = ort_session(onnx_path, threads), read_inputs(onnx_path)
    for inputs, targets in loader:
        meter.update(torch.from_numpy(sess.run(None, graph_feed(specs, inputs))[0].astype(np.float32)), targets)
    return meter.result()


# ---------------------------------------------------------------------------------------------
# N:M (2:4) check on ONNX initializers, along the axis TensorRT reads.

_PASS_THROUGH = {"Identity", "Transpose", "Cast", "DequantizeLinear", "Reshape", "Unsqueeze", "Squeeze"}


def _trace_initializer(name: str, producers: dict, inits: dict):
    """Follow Transpose/Cast/DequantizeLinear/Identity back to an initializer; return the array as
    the consuming node sees it (transposes applied), or None when it is not a constant."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is None or node.op_type not in _PASS_THROUGH and node.op_type != "Constant":
        return None
    if node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
        return None
    src = _trace_initializer(node.input[0], producers, inits)
    if src is None:
        return None
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return np.transpose(src, perm)
    if node.op_type == "DequantizeLinear":
        # y = (x - zero_point) * scale: a quantized weight is zero where x == zero_point
        zp = _trace_initializer(node.input[2], producers, inits) if len(node.input) > 2 and node.input[2] else None
        out = src.astype(np.float32)
        if zp is not None and zp.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * out.ndim
            shape[axis] = -1
            zp = zp.reshape(shape)
        return out - (zp.astype(np.float32) if zp is not None else 0.0)
    if node.op_type in ("Reshape", "Unsqueeze", "Squeeze"):
        return None if node.op_type == "Reshape" else src
    return src


def check_sparsity(path: str | Path, n: int = 2, m: int = 4) -> dict:
    """For every Conv/Gemm/MatMul with a constant weight: does it hold N:M (at most ``n`` non-zeros
    in every ``m`` consecutive weights, see :mod:`compress.sparsity.n_m`) along the reduction axis
    TensorRT reads (Conv axis 1; Gemm axis 1 if transB=1 else 0; MatMul second input axis 0)?

    Per layer: ``holds_pattern`` (the pattern asked), ``sparse_2_4`` (2:4 whatever was asked, the
    field earlier versions published), ``fraction_groups_ok`` (of the pattern asked), ``eligible``
    (the reduction dim is a multiple of ``m`` and the layer is not depthwise). Totals:
    ``sparse_layers`` (layers holding the pattern asked), ``eligible_layers``, ``total_layers``."""
    import onnx

    from ..sparsity.n_m import n_m_check

    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    proto = onnx.load(str(path))
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: node for node in g.node for o in node.output}
    layers = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = _trace_initializer(node.input[1], producers, inits) if len(node.input) > 1 else None
        if w is None or w.ndim < 2:
            continue
        if node.op_type == "Conv":
            axis = 1
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1 and w.shape[1] == 1:
                layers.append({"node": node.name or node.output[0], "op": "Conv", "shape": list(w.shape), "axis": 1,
                               "holds_pattern": False, "sparse_2_4": False, "eligible": False, "reason": "depthwise"})
                continue
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 1 if trans_b else 0
        else:
            axis = w.ndim - 2  # MatMul: B is [.., K, N]; K (the reduction) is the second-to-last
        ok, frac = n_m_check(w, axis, n, m)
        ok24 = ok if (n, m) == (2, 4) else n_m_check(w, axis, 2, 4)[0]
        eligible = w.shape[axis] % m == 0
        layers.append({"node": node.name or node.output[0], "op": node.op_type, "shape": list(w.shape), "axis": axis,
                       "holds_pattern": ok, "sparse_2_4": ok24, "fraction_groups_ok": round(frac, 4),
                       "eligible": eligible,
                       **({} if eligible else {"reason": f"reduction dim {w.shape[axis]} % {m} != 0"})})
    n_sparse = sum(1 for layer in layers if layer["holds_pattern"])
    return {"file": str(path), "pattern": f"{n}:{m}", "layers": layers, "sparse_layers": n_sparse,
            "eligible_layers": sum(1 for layer in layers if layer["eligible"]), "total_layers": len(layers)}
