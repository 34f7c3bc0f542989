"""Pipeline stages. Importing this package registers every built-in stage in ``STAGES``; a new
stage is one module here with a ``Config`` and a ``run``, plus its name in the import below."""
from . import benchmark, export, finetune, lottery, prune, search, sparsify, tensorrt, train
from .artifacts import Artifacts, OnnxFiles
from .base import STAGES, StageConfig, StageContext, StageOutput, StageSpec, register_stage

__all__ = ["STAGES", "Artifacts", "OnnxFiles", "StageConfig", "StageContext", "StageOutput", "StageSpec",
           "register_stage", "benchmark", "export", "finetune", "lottery", "prune", "search", "sparsify",
           "tensorrt", "train"]
