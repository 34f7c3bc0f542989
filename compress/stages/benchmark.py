"""``benchmark``: dense vs compressed latency on each backend and batch size, interleaved in one
process, medians and tails (:mod:`compress.deploy.bench`, which ``compress benchmark`` shares)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import StageConfig
from ..errors import InputError
from ..deploy.backends import BACKENDS
from ..deploy.bench import Subject, time_backends
from ..deploy import tensorrt as trb
from ..deploy.timing import BackendUnavailable
from ..deploy.onnx_io import export_onnx
from ..progress import log
from .artifacts import ONNX_INT8
from .base import StageOutput, register_stage


class Config(StageConfig):
    kind: Literal["benchmark"] = "benchmark"
    backends: list[str] = Field(default_factory=lambda: ["onnxruntime"])
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    threads: int = Field(1, ge=1, le=1024, description="intra-op threads (fixed, so numbers are comparable)")
    warmup: int = Field(10, ge=0)
    iters: int = Field(100, ge=1, description="timed calls per model per batch size")
    rounds: int = Field(10, ge=1, description="interleaving rounds (order flips each round)")
    precision: Literal["fp32", "fp16", "int8", "best"] = Field("fp16", description="tensorrt backend engines")
    cuda_graph: bool = Field(False, description="tensorrt backend: replay a captured CUDA graph")
    semi_structured: bool = Field(True, description="torch backends on CUDA: 2:4 Linear weights as "
                                                    "torch.sparse semi-structured tensors")

    def needs(self) -> dict[str, str]:
        """``onnxruntime_int8``, and ``tensorrt`` at int8/best, time the export stage's int8 file.
        The fp32 files need no export stage: without one the stage exports its own (by design, so a
        recipe can benchmark without deployment files)."""
        if "onnxruntime_int8" in self.backends:
            return {ONNX_INT8: "backends"}
        if "tensorrt" in self.backends and self.precision in ("int8", "best"):
            return {ONNX_INT8: "precision"}
        return {}

    def unavailable_here(self) -> tuple[str, str] | None:
        if self.optional or "tensorrt" not in self.backends:
            return None
        try:
            trb.require_tensorrt()
        except BackendUnavailable as exc:
            return "backends", f"backend 'tensorrt' cannot run here: {exc}"
        return None

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        for b in v:
            if b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r} (known: {', '.join(BACKENDS.names())})")
        if not v:
            raise ValueError("needs at least one backend")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _bs(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("needs one or more batch sizes >= 1")
        return v


@register_stage("benchmark", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Time dense and compressed models on each backend and batch size."""
    compressed_onnx = ctx.path(ctx.artifacts.onnx.fp32)
    dense_onnx = ctx.path(ctx.artifacts.onnx.dense_fp32)
    if compressed_onnx is None or not compressed_onnx.exists():
        compressed_onnx = export_onnx(ctx.model, ctx.input_shape, ctx.stage_dir / "compressed.onnx")
    if ctx.dense is not None and (dense_onnx is None or not dense_onnx.exists()):
        dense_onnx = export_onnx(ctx.dense, ctx.input_shape, ctx.stage_dir / "dense.onnx")

    def unavailable(backend: str, exc: BackendUnavailable) -> None:
        if not cfg.optional:
            raise InputError(f"backend {backend!r} cannot run here: {exc} (mark the stage "
                             "'optional: true' to skip it on such machines)",
                             field=f"stages[{ctx.index}].backends") from None
        log(f"[yellow]benchmark: {backend} unavailable here ({exc}); skipped[/]")

    opts = {"device": str(ctx.device), "precision": cfg.precision, "cuda_graph": cfg.cuda_graph,
            "semi_structured": cfg.semi_structured}
    if any(b in ("torch", "torch_compile") for b in cfg.backends):  # their inputs: a real item (tensor, tuple or dict)
        opts["example"] = ctx.example_inputs(1)
    dense = Subject(dense_onnx, ctx.dense, ctx.input_shape) if dense_onnx is not None else None
    rows, skipped = time_backends(Subject(compressed_onnx, ctx.model, ctx.input_shape), dense, cfg.backends,
                                  cfg.batch_sizes, threads=cfg.threads, warmup=cfg.warmup, iters=cfg.iters,
                                  rounds=cfg.rounds, options=opts, on_unavailable=unavailable)
    none_ran = "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped) if not rows else None
    return StageOutput(metrics={"rows": len(rows), "skipped_backends": skipped}, skipped=none_ran,
                       summary={"benchmark": rows, **({"benchmark_skipped": skipped} if skipped else {})})
