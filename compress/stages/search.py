"""``search``: latency-aware per-group pruning ratios, searched with Optuna on the target backend.

The procedure is :mod:`compress.search.procedure`; its settings are
:class:`compress.search.config.SearchConfig`. The stage leaves the chosen (pruned, fine-tuned)
model in ``ctx.model`` and writes, in its stage directory: ``prune_block.yaml`` (a ``per_layer``
prune stage to paste into a recipe), ``pareto.png``, ``comparison.md`` and ``search.json``.
The Optuna study and the latency table live in the run directory itself so that they survive a
re-run (the runner clears a stage directory that did not finish).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator

from ..deploy.backends import BACKENDS
from ..errors import InputError
from ..search.config import SearchConfig
from .artifacts import MASKS
from .base import StageConfig, StageOutput, register_stage
from .criteria_names import known_criterion


class Config(SearchConfig, StageConfig):  # this base order keeps kind and optional first in the schema
    kind: Literal["search"] = "search"
    changes_structure: ClassVar[bool] = True

    @field_validator("backend")
    @classmethod
    def _registered(cls, v: str) -> str:
        try:
            BACKENDS.get(v)
        except InputError as exc:  # the registry's own one-line message, as a field error
            raise ValueError(str(exc)) from None
        return v

    @field_validator("importance")
    @classmethod
    def _criterion(cls, v: str) -> str:
        return known_criterion(v, "importance")  # the names only: the criteria are imported when the search runs

    def conflicts(self) -> dict[str, str]:
        return {MASKS: "searching channel widths after weight masks were set drops the masks; search before "
                       "sparsify or lottery"}


@register_stage("search", Config)
def run(cfg: Config, ctx) -> StageOutput:
    """Search per-group pruning ratios for the best accuracy within a latency (or MACs) budget."""
    from ..search.procedure import SearchInputs, run_search  # Torch-Pruning, Optuna: only to run

    out = run_search(cfg, SearchInputs(
        model=ctx.model, teacher=ctx.dense, data=ctx.data, input_shape=ctx.input_shape, batch_size=ctx.batch_size,
        seed=ctx.seed, run_dir=Path(ctx.run_dir), stage_dir=Path(ctx.stage_dir), run_name=ctx.run_name,
        device=ctx.device, calibration=ctx.calibration_batches(4)))
    if cfg.apply:
        ctx.model = out.model
    result = out.result
    return StageOutput(metrics={k: result[k] for k in ("trials_total", "trials_added", "chosen", "uniform_ratio",
                                                       "global_ratio", "predictor_abs_error_pct_median",
                                                       "within_budget", "measured_ratio")},
                       summary={"search": result})
