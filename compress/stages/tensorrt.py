"""``tensorrt``: build TensorRT engines from the exported ONNX files and time them on the GPU.

Three engines, built and timed in one run: the dense model, the compressed model without sparse
math, and the compressed model with ``SPARSE_WEIGHTS`` — so the report separates what pruning
bought from what 2:4 bought, and says which layers TensorRT found eligible for sparse math and
which actually picked sparse tactics. Needs ``compress-models[tensorrt]`` and a CUDA GPU; elsewhere the
stage says so once and ``optional: true`` makes it a skip.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .base import StageConfig
from ..deploy import tensorrt as trb
from ..deploy.timing import BackendUnavailable
from ..progress import log
from ..errors import InputError
from ..paths import tensorrt_dir
from .artifacts import ENGINES, ONNX, ONNX_INT8
from .base import StageOutput, register_stage


class Config(StageConfig):
    kind: Literal["tensorrt"] = "tensorrt"
    precision: Literal["fp32", "fp16", "int8", "best"] = "fp16"
    typing: Literal["auto", "strong", "weak"] = Field(
        "auto", description="auto: strongly typed on TensorRT >= 10.12 (precision from the ONNX types)")
    min_batch: int = Field(1, ge=1)
    opt_batch: int = Field(32, ge=1)
    max_batch: int = Field(64, ge=1)
    batch_sizes: Optional[list[int]] = Field(None, description="timed batch sizes; default [opt_batch]")
    workspace_mb: int = Field(4096, ge=16)
    optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: Optional[str] = Field(None, description="timing cache file; default <run>/tensorrt/timing.cache")
    engines: list[Literal["dense", "compressed_dense_math", "compressed"]] = Field(
        default_factory=lambda: ["dense", "compressed_dense_math", "compressed"])
    cuda_graph: bool = False
    warmup: int = Field(20, ge=0)
    iters: int = Field(200, ge=1)
    rounds: int = Field(10, ge=1)

    def needs(self) -> dict[str, str]:
        """Engines are built from the export stage's files; int8 and best from its int8 Q/DQ file."""
        return {ONNX: "kind", **({ONNX_INT8: "precision"} if self.precision in ("int8", "best") else {})}

    def provides(self) -> set[str]:
        return {ENGINES}

    def unavailable_here(self) -> tuple[str, str] | None:
        if self.optional:
            return None
        try:
            trb.require_tensorrt()
        except BackendUnavailable as exc:
            return "kind", str(exc)
        return None

    @model_validator(mode="after")
    def _batches(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("needs min_batch <= opt_batch <= max_batch")
        for b in self.batch_sizes or []:
            if not self.min_batch <= b <= self.max_batch:
                raise ValueError(f"batch size {b} outside [min_batch, max_batch]")
        return self


def _onnx_for(ctx, role: str, cfg: Config, strong: bool):
    """The ONNX file an engine is built from (the fp16 export for strongly typed fp16 builds)."""

    rel = ctx.artifacts.onnx.dense_fp32 if role == "dense" else ctx.artifacts.onnx.fp32
    if rel is None:  # the recipe loader refuses a tensorrt stage without an export before it
        raise RuntimeError("bug: a tensorrt stage without exported ONNX files passed recipe validation")
    return trb.onnx_for_precision(ctx.path(rel), cfg.precision, strong)


@register_stage("tensorrt", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Build dense / compressed / compressed+sparse engines and time them with CUDA events."""

    try:
        trt = trb.require_tensorrt()
    except BackendUnavailable as exc:
        if not cfg.optional:
            raise InputError(f"{exc} (mark the stage 'optional: true' to skip it on such machines)",
                             field=f"stages[{ctx.index}].kind") from None
        log(f"[yellow]tensorrt: {exc}; stage skipped[/]")
        return StageOutput(skipped=str(exc), summary={"tensorrt": {"skipped": str(exc)}})
    strong = trb.use_strong_typing(trt, cfg.typing)
    out_dir = tensorrt_dir(ctx.run_dir)
    cache = cfg.timing_cache or str(out_dir / "timing.cache")
    built: list[trb.BuiltEngine] = []
    for name in cfg.engines:
        if name == "dense" and ctx.dense is None:
            continue
        opts = trb.BuildOptions(precision=cfg.precision, sparse_weights=(name == "compressed"), typing=cfg.typing,
                                min_batch=cfg.min_batch, opt_batch=cfg.opt_batch, max_batch=cfg.max_batch,
                                workspace_mb=cfg.workspace_mb, optimization_level=cfg.optimization_level,
                                timing_cache=cache)
        log(f"tensorrt: building {name} engine ({cfg.precision}, {'strongly' if strong else 'weakly'} typed)")
        built.append(trb.build_engine(_onnx_for(ctx, "dense" if name == "dense" else "compressed", cfg, strong),
                                      out_dir, name, opts))
    trb.write_build_record(out_dir / "engines.json", built)
    ctx.artifacts.engines = str((out_dir / "engines.json").relative_to(ctx.run_dir))
    timings = []
    for bs in cfg.batch_sizes or [cfg.opt_batch]:
        runners = {e.name: trb.EngineRunner(e.engine, bs, cuda_graph=cfg.cuda_graph) for e in built}
        res = trb.time_engines(runners, bs, warmup=cfg.warmup, iters=cfg.iters, rounds=cfg.rounds)
        timings += [{"engine": n, **r} for n, r in res.items()]
        del runners
    sparse = next((e.sparsity for e in built if e.name == "compressed"), {})
    summary = {"tensorrt": {"version": trt.__version__, "strongly_typed": strong, "precision": cfg.precision,
                            "cuda_graph": cfg.cuda_graph, "engines": [e.to_dict() for e in built],
                            "timings": timings, "sparsity": sparse}}
    by = {(t["engine"], t["batch_size"]): t for t in timings}
    speed = {}
    for bs in cfg.batch_sizes or [cfg.opt_batch]:
        c, d = by.get(("compressed", bs)), by.get(("compressed_dense_math", bs))
        if c and d:
            speed[f"sparse_math_speedup_b{bs}"] = d["gpu_ms_p50"] / c["gpu_ms_p50"]
    return StageOutput(metrics={"engines": [e.name for e in built], "num_eligible": sparse.get("num_eligible"),
                                "num_picked_sparse": sparse.get("num_picked_sparse"), **speed}, summary=summary)
