"""``export``: ONNX for the compressed model (and the dense one, for benchmarking), parity on real
validation inputs, the 2:4 check read back from the ONNX initializers, and optionally an fp16 ONNX
(for GPU engines) and a ``torch.export`` ``.pt2`` program (for serving with PyTorch)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Strict, StageConfig
from ..core.onnx_io import check_sparsity, export_fp16_onnx, export_onnx, export_pt2, parity
from ..core.progress import log
from .base import StageOutput, register_stage


class OnnxOptions(Strict):
    opset: int = Field(17, ge=11, le=23)
    dynamic_batch: bool = True
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    external_data: bool | None = Field(None, description="default: on for models over 1.5 GB")
    fp16: bool = Field(False, description="also write model.fp16.onnx (float16 weights, float32 inputs/outputs)")


class Config(StageConfig):
    kind: Literal["export"] = "export"
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    pt2: bool = Field(False, description="also write model.pt2 (torch.export.save)")
    parity_samples: int = Field(256, ge=1, description="validation inputs compared torch vs ONNX Runtime")


def export_pair(cfg: Config, ctx, out_dir) -> dict:
    """Export compressed (run_dir/model.onnx) and dense (stage dir) models."""
    o = cfg.onnx
    kw = dict(opset=o.opset, dynamic_batch=o.dynamic_batch, exporter=o.exporter, external_data=o.external_data)
    compressed = export_onnx(ctx.model, ctx.input_shape, ctx.run_dir / "model.onnx", **kw)
    result = {"onnx": str(compressed.relative_to(ctx.run_dir))}
    if (ctx.run_dir / "model.onnx.data").exists():
        result["onnx_external_data"] = "model.onnx.data"
    if ctx.dense is not None:
        dense = export_onnx(ctx.dense, ctx.input_shape, out_dir / "dense.onnx", **kw)
        result["dense_onnx"] = str(dense.relative_to(ctx.run_dir))
    if o.fp16:
        result["onnx_fp16"] = str(export_fp16_onnx(compressed, ctx.run_dir / "model.fp16.onnx").relative_to(ctx.run_dir))
        if ctx.dense is not None:
            result["dense_onnx_fp16"] = str(export_fp16_onnx(out_dir / "dense.onnx", out_dir / "dense.fp16.onnx")
                                            .relative_to(ctx.run_dir))
    if cfg.pt2:
        result["pt2"] = str(export_pt2(ctx.model, ctx.input_shape, ctx.run_dir / "model.pt2",
                                       dynamic_batch=o.dynamic_batch).relative_to(ctx.run_dir))
    return result


def _fp16_parity(ctx, path, x) -> dict:
    """fp16 ONNX vs torch fp32, reported (not gated: half precision is not meant to match to 1e-4).
    ONNX Runtime's CPU provider lacks some fp16 kernels; then the check says so."""
    try:
        p = parity(ctx.model, path, x)
    except Exception as exc:  # onnxruntime raises its own types (NOT_IMPLEMENTED) for missing kernels
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log(f"[yellow]export: fp16 parity not measurable with ONNX Runtime CPU here ({msg})[/]")
        return {"fp16_parity": f"not measured: {msg}"}
    return {"fp16_" + k: v for k, v in p.items() if k != "parity_samples"}


@register_stage("export", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Export to ONNX, check parity with ONNX Runtime and read back the 2:4 pattern."""
    paths = export_pair(cfg, ctx, ctx.stage_dir)
    x = ctx.data.test_x[: cfg.parity_samples].cpu()
    par = parity(ctx.model, ctx.run_dir / paths["onnx"], x)
    extra = _fp16_parity(ctx, ctx.run_dir / paths["onnx_fp16"], x) if "onnx_fp16" in paths else {}
    sparsity = check_sparsity(ctx.run_dir / paths["onnx"])
    summary = {"export": {**paths, "opset": cfg.onnx.opset, "dynamic_batch": cfg.onnx.dynamic_batch,
                          "exporter": cfg.onnx.exporter, **par, **extra,
                          "sparsity_2_4": {"sparse_layers": sparsity["sparse_layers"],
                                           "total_layers": sparsity["total_layers"],
                                           "layers": sparsity["layers"]}}}
    ctx.model.to(ctx.device)
    if ctx.dense is not None:
        ctx.dense.to(ctx.device)
    return StageOutput(metrics={**par, "sparse_layers": sparsity["sparse_layers"]}, summary=summary)
