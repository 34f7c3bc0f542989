"""``export``: ONNX for the compressed model (and the dense one, for benchmarking), parity on real
validation inputs, and the 2:4 check read back from the ONNX initializers."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Strict, StageConfig
from ..core.onnx_io import check_sparsity, export_onnx, parity
from .base import StageOutput, register_stage


class OnnxOptions(Strict):
    opset: int = Field(17, ge=11, le=23)
    dynamic_batch: bool = True
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    external_data: bool | None = Field(None, description="default: on for models over 1.5 GB")


class Config(StageConfig):
    kind: Literal["export"] = "export"
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    parity_samples: int = Field(256, ge=1, description="validation inputs compared torch vs ONNX Runtime")


def export_pair(cfg: Config, ctx, out_dir) -> dict:
    """Export compressed (run_dir/model.onnx) and dense (stage dir) models."""
    o = cfg.onnx
    kw = dict(opset=o.opset, dynamic_batch=o.dynamic_batch, exporter=o.exporter, external_data=o.external_data)
    compressed = export_onnx(ctx.model, ctx.input_shape, ctx.run_dir / "model.onnx", **kw)
    result = {"onnx": str(compressed.relative_to(ctx.run_dir))}
    if ctx.dense is not None:
        dense = export_onnx(ctx.dense, ctx.input_shape, out_dir / "dense.onnx", **kw)
        result["dense_onnx"] = str(dense.relative_to(ctx.run_dir))
    return result


@register_stage("export", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Export to ONNX, check parity with ONNX Runtime and read back the 2:4 pattern."""
    paths = export_pair(cfg, ctx, ctx.stage_dir)
    x = ctx.data.test_x[: cfg.parity_samples].cpu()
    par = parity(ctx.model, ctx.run_dir / paths["onnx"], x)
    sparsity = check_sparsity(ctx.run_dir / paths["onnx"])
    summary = {"export": {**paths, "opset": cfg.onnx.opset, **par,
                          "sparsity_2_4": {"sparse_layers": sparsity["sparse_layers"],
                                           "total_layers": sparsity["total_layers"],
                                           "layers": sparsity["layers"]}}}
    ctx.model.to(ctx.device)
    return StageOutput(metrics={**par, "sparse_layers": sparsity["sparse_layers"]}, summary=summary)
