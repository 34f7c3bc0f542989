"""What stages hand to later stages, typed: the dense teacher and the deployment files.

A stage reads ``ctx.artifacts`` and records what it wrote there; the runner stores the artifacts
in every stage's ``result.json`` and restores them on ``--resume``. Stages declare by name which
artifacts they need and provide (the constants below), and the recipe loader checks the order of
the stages against those declarations before anything runs.

Paths are relative to the run directory, so a run directory can be moved.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Artifact names used in stage declarations (StageConfig.needs / provides).
TEACHER = "teacher"        # the dense model, snapshot before the first structure-changing stage
ONNX = "onnx"              # model.onnx (+ dense.onnx) from an export stage
ONNX_FP16 = "onnx.fp16"
ONNX_INT8 = "onnx.int8"    # calibrated Q/DQ files (export.onnx.int8)
PT2 = "pt2"
MASKS = "masks"            # weight masks (2:4, lottery tickets) that a later stage must keep
ENGINES = "tensorrt.engines"

# Files written from the model as it was at that point: a later stage that changes the model
# (StageConfig.changes_model) would leave them describing a model the run no longer ends with.
SNAPSHOTS = frozenset({ONNX, ONNX_FP16, ONNX_INT8, PT2, ENGINES})

# How to get each one, for the validation message.
HOW = {
    TEACHER: "it is recorded before the first stage that changes the model's structure (prune, sparsify, "
             "lottery, search): put one before this stage",
    ONNX: "add an export stage before this one",
    ONNX_FP16: "add 'fp16: true' to the onnx block of an export stage before this one",
    ONNX_INT8: "add 'int8: true' to the onnx block of an export stage before this one",
    PT2: "add 'pt2: true' to an export stage before this one",
    MASKS: "add a sparsify or lottery stage before this one",
    ENGINES: "add a tensorrt stage before this one",
}


@dataclass
class OnnxFiles:
    """The export stage's files (None: not written). ``fp32`` is the compressed model."""

    fp32: str | None = None
    fp16: str | None = None
    int8: str | None = None
    dense_fp32: str | None = None
    dense_fp16: str | None = None
    dense_int8: str | None = None
    external_data: str | None = None
    pt2: str | None = None

    def compressed(self, precision: str = "fp32") -> str | None:
        return {"fp32": self.fp32, "fp16": self.fp16, "int8": self.int8}[precision]

    def dense(self, precision: str = "fp32") -> str | None:
        return {"fp32": self.dense_fp32, "fp16": self.dense_fp16, "int8": self.dense_int8}[precision]


@dataclass
class Artifacts:
    teacher: str | None = None                 # the dense teacher's checkpoint folder
    onnx: OnnxFiles = field(default_factory=OnnxFiles)
    engines: str | None = None                 # the tensorrt stage's build record (engines.json)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Artifacts":
        d = dict(d or {})
        known = {f.name for f in fields(OnnxFiles)}
        onnx = OnnxFiles(**{k: v for k, v in (d.pop("onnx", None) or {}).items() if k in known})
        return cls(teacher=d.get("teacher"), onnx=onnx, engines=d.get("engines"))
