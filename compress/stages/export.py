"""``export``: ONNX for the compressed model (and the dense one, for benchmarking), parity on real
validation inputs, the 2:4 check read back from the ONNX initializers, and optionally an fp16 ONNX
(for GPU engines), an int8 Q/DQ ONNX calibrated on training batches (for TensorRT int8 engines and
ONNX Runtime int8 on CPU) and a ``torch.export`` ``.pt2`` program (for serving with PyTorch)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..config import Strict
from .base import StageConfig
from ..deploy.onnx_io import (check_sparsity, export_fp16_onnx, export_pt2, onnx_export, onnx_metrics, parity,
                              torch_logits)
from ..metrics import batch_inputs, to_device
from ..deploy.quantize import export_int8_onnx, quantized_nodes, unquantized_inputs
from ..progress import log
from ..deploy.files import COMPRESSED_ONNX, DENSE_ONNX, EXTERNAL_DATA_SUFFIX, onnx_sibling
from ..deploy.files import PT2 as PT2_FILE
from .artifacts import ONNX, ONNX_FP16, ONNX_INT8, PT2, OnnxFiles
from .base import StageOutput, register_stage


class Int8Options(Strict):
    """Post-training int8 (explicit Q/DQ, symmetric, per-channel weights); ``int8: true`` takes
    these defaults."""

    calibration_batches: int = Field(8, ge=1, description="training-split batches for the activation ranges")
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True


class OnnxOptions(Strict):
    opset: int = Field(17, ge=11, le=23, description="asked for; the dynamo exporter writes >= 18, and the "
                                                     "opset written is read back and reported")
    dynamic_batch: bool = True
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="auto/dynamo: the dynamo exporter, falling back to TorchScript when it fails or does "
                            "not match (reported); torchscript: that one first, dynamo as the fallback")
    external_data: bool | None = Field(None, description="default: on for models over 1.5 GB")
    fp16: bool = Field(False, description="also write model.fp16.onnx (float16 weights, float32 inputs/outputs)")
    int8: Optional[Int8Options] = Field(None, description="also write model.int8.onnx (Q/DQ, calibrated); "
                                                          "true for the defaults")

    @field_validator("int8", mode="before")
    @classmethod
    def _int8_switch(cls, v):
        if v is True:
            return {}
        return None if v is False else v

    @model_validator(mode="after")
    def _int8_opset(self):
        if self.int8 is not None and self.opset < 13:
            raise ValueError("int8 needs opset >= 13 (per-channel DequantizeLinear)")
        return self


class Config(StageConfig):
    kind: Literal["export"] = "export"
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    pt2: bool = Field(False, description="also write model.pt2 (torch.export.save)")
    parity_samples: int = Field(256, ge=1, description="validation inputs compared torch vs ONNX Runtime")

    def provides(self) -> set[str]:
        out = {ONNX}
        if self.onnx.fp16:
            out.add(ONNX_FP16)
        if self.onnx.int8 is not None:
            out.add(ONNX_INT8)
        if self.pt2:
            out.add(PT2)
        return out


# summary.json's published keys for each file (the artifacts hold the same paths, typed)
SUMMARY_KEYS = {"fp32": "onnx", "external_data": "onnx_external_data", "dense_fp32": "dense_onnx",
                "fp16": "onnx_fp16", "dense_fp16": "dense_onnx_fp16", "int8": "onnx_int8",
                "dense_int8": "dense_onnx_int8", "pt2": "pt2"}


def onnx_metadata(ctx) -> dict:
    """``metadata_props`` of every exported file: the input contract whoever serves it needs."""
    pre = ctx.data.preprocess
    return {"compress.task": ctx.objective.name,
            "compress.preprocess": pre.contract() if pre is not None else
            "defined by the dataset callable (data.dataset); compress applied none",
            "compress.dataset": ctx.data.name}


def export_files(cfg: Config, ctx, out_dir) -> tuple[OnnxFiles, dict]:
    """Export the compressed model (run dir) and the dense one (``out_dir``), plus the precision
    variants and the ``.pt2`` program the config asks for; paths relative to the run directory.
    Also returns how the compressed file was written (exporter, opset read back, any fallback)."""
    o = cfg.onnx
    # real test items (the model's true input types); batch 2: torch.export fixes a size-1 batch axis
    example = to_device(ctx.example_inputs(2), "cpu")
    kw = dict(opset=o.opset, dynamic_batch=o.dynamic_batch, exporter=o.exporter, external_data=o.external_data,
              example=example, metadata=onnx_metadata(ctx))
    rel = (lambda p: str(Path(p).relative_to(ctx.run_dir)))
    files = OnnxFiles()
    written = onnx_export(ctx.model, ctx.input_shape, ctx.run_dir / COMPRESSED_ONNX, **kw)
    how = written.metrics()
    if written.fallback:
        log(f"[yellow]export: {written.fallback}[/]")
    compressed = written.path
    files.fp32 = rel(compressed)
    external = compressed.with_name(compressed.name + EXTERNAL_DATA_SUFFIX)
    if external.exists():
        files.external_data = rel(external)
    dense = None
    if ctx.dense is not None:
        # the dense file takes the exporter the compressed one ended with (same graph family)
        dense_written = onnx_export(ctx.dense, ctx.input_shape, out_dir / DENSE_ONNX,
                                    **{**kw, "exporter": written.exporter})
        dense = dense_written.path
        files.dense_fp32 = rel(dense)
        if dense_written.exporter != written.exporter or dense_written.fallback:
            how["dense_exporter"] = dense_written.exporter
            if dense_written.fallback:
                how["dense_export_fallback"] = dense_written.fallback
    if o.fp16:
        files.fp16 = rel(export_fp16_onnx(compressed, onnx_sibling(compressed, "fp16")))
        if dense is not None:
            files.dense_fp16 = rel(export_fp16_onnx(dense, onnx_sibling(dense, "fp16")))
    if o.int8 is not None:
        # every input of the batch (tensor, tuple or dict: token ids + attention mask), on the CPU
        calib = [to_device(batch_inputs(b), "cpu") for b in ctx.calibration_batches(o.int8.calibration_batches)]
        kw8 = dict(method=o.int8.calibration, per_channel=o.int8.per_channel)
        files.int8 = rel(export_int8_onnx(compressed, onnx_sibling(compressed, "int8"), calib, **kw8))
        if dense is not None:
            files.dense_int8 = rel(export_int8_onnx(dense, onnx_sibling(dense, "int8"), calib, **kw8))
    if cfg.pt2:
        files.pt2 = rel(export_pt2(ctx.model, ctx.input_shape, ctx.run_dir / PT2_FILE, dynamic_batch=o.dynamic_batch))
    return files, how


def _fp16_parity(ctx, path, x, ref) -> dict:
    """fp16 ONNX vs torch fp32, reported (not gated: half precision is not meant to match to 1e-4).
    ONNX Runtime's CPU provider lacks some fp16 kernels; then the check says so."""
    try:
        p = parity(ctx.model, path, x, reference=ref)
    except Exception as exc:  # onnxruntime raises its own types (NOT_IMPLEMENTED) for missing kernels
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log(f"[yellow]export: fp16 parity not measurable with ONNX Runtime CPU here ({msg})[/]")
        return {"fp16_parity": f"not measured: {msg}"}
    return {"fp16_" + k: v for k, v in p.items() if k != "parity_samples"}


def _int8_report(ctx, path, x, ref) -> dict:
    """int8 file vs torch fp32: parity on the validation inputs, accuracy on the whole test split
    (ONNX Runtime CPU), how many layers run in int8, which inputs int8 does not apply to (integer
    token ids, masks: they stay integer) and whether 2:4 survived quantization."""
    p = parity(ctx.model, path, x, reference=ref)
    kept = unquantized_inputs(path)
    if kept:
        log("export: int8 leaves the integer input(s) " + ", ".join(f"{k} ({v})" for k, v in kept.items())
            + " unquantized; the quantized layers read float activations computed from them")
    sp = check_sparsity(path)
    primary = ctx.objective.primary
    score = onnx_metrics(path, ctx.eval_loader(), ctx.objective.meter())[primary]
    return {"int8_" + k: v for k, v in p.items() if k != "parity_samples"} | {
        f"int8_{primary}": score,
        "int8_quantized_layers": quantized_nodes(path),
        "int8_unquantized_inputs": kept,
        "int8_sparsity_2_4": {"sparse_layers": sp["sparse_layers"], "total_layers": sp["total_layers"]}}


@register_stage("export", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Export to ONNX, check parity with ONNX Runtime and read back the 2:4 pattern."""
    files, how = export_files(cfg, ctx, ctx.stage_dir)
    ctx.artifacts.onnx = files
    paths = {key: getattr(files, attr) for attr, key in SUMMARY_KEYS.items() if getattr(files, attr) is not None}
    x = to_device(ctx.example_inputs(cfg.parity_samples), "cpu")  # real test inputs
    ref = torch_logits(ctx.model, x)  # one torch pass for every file compared
    par = parity(ctx.model, ctx.path(files.fp32), x, reference=ref)
    extra = _fp16_parity(ctx, ctx.path(files.fp16), x, ref) if files.fp16 else {}
    if files.int8:
        extra |= _int8_report(ctx, ctx.path(files.int8), x, ref)
    sparsity = check_sparsity(ctx.path(files.fp32))
    summary = {"export": {**paths, **how, "opset_requested": cfg.onnx.opset,
                          "dynamic_batch": cfg.onnx.dynamic_batch, **par, **extra,
                          "sparsity_2_4": {"sparse_layers": sparsity["sparse_layers"],
                                           "eligible_layers": sparsity["eligible_layers"],
                                           "total_layers": sparsity["total_layers"],
                                           "layers": sparsity["layers"]}}}
    ctx.model.to(ctx.device)
    if ctx.dense is not None:
        ctx.dense.to(ctx.device)
    int8 = {k: extra[k] for k in ("int8_accuracy", "int8_parity_top1_agreement") if k in extra}
    return StageOutput(metrics={**par, **int8, **how, "sparse_layers": sparsity["sparse_layers"]}, summary=summary)
