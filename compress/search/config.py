"""The search settings (the ``search`` stage's recipe block without ``kind``): budget, study,
latency table, accuracy proxy, the candidates' fine-tune and their end-to-end measurement."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..config import Strict
from ..extras import installed
from ..train.config import FinetuneBlock


# SQLAlchemy dialect -> the Python driver modules it can use (the first is the one to install)
DB_DRIVERS = {"postgresql": ["psycopg2", "psycopg", "pg8000"], "mysql": ["pymysql", "MySQLdb", "mysql"]}
PIP_NAMES = {"psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "mysql": "mysql-connector-python"}


class ProxyConfig(Strict):
    kind: Literal["finetune", "kept_importance"] = Field(
        "finetune", description="finetune: BatchNorm re-estimation + a few distilled steps, then held-out "
                                "accuracy; kept_importance: data-free")
    bn_batches: int = Field(10, ge=0, description="training batches to re-estimate BatchNorm statistics")
    steps: int = Field(0, ge=0, description="distillation steps after the BatchNorm re-estimation")
    lr: float = Field(0.01, gt=0)
    val_size: int = Field(512, ge=16, description="held-out examples carved from the training split")


class MeasureConfig(Strict):
    warmup: int = Field(5, ge=0)
    iters: int = Field(40, ge=1)
    rounds: int = Field(4, ge=1)


class SearchConfig(Strict):
    objective: Literal["constrained", "pareto"] = Field(
        "constrained", description="constrained: best proxy within the budget (TPE); pareto: NSGA-II front")
    budget_metric: Literal["latency", "macs"] = "latency"
    budget: float = Field(0.5, gt=0, lt=1, description="fraction of the dense model's latency (or MACs)")
    trials: int = Field(30, ge=1, description="trials added to the study by this run")
    workers: int = Field(1, ge=1, description="parallel trials in this process (Optuna n_jobs)")
    storage: Optional[str] = Field(None, description="Optuna RDB URL; default sqlite:///<run dir>/search.db")
    study_name: Optional[str] = None
    importance: str = "l2"
    round_to: Optional[int] = Field(8, ge=1)
    ignore: Optional[list[str]] = None
    max_ratio: float = Field(0.8, gt=0, lt=1, description="upper bound of every group's ratio")
    ratio_step: float = Field(0.05, gt=0, lt=1)
    backend: str = "onnxruntime"
    batch_size: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    grid: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
                              description="width fractions measured per layer")
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    top_k: int = Field(3, ge=1, description="candidates that get the real fine-tune")
    finetune: Optional[FinetuneBlock] = Field(
        default_factory=lambda: FinetuneBlock(epochs=1, distill={"alpha": 0.7, "temperature": 4.0}),
        description="the same fine-tune for uniform, global and the top candidates; null skips it")
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    latency_tolerance: float = Field(0.05, ge=0, description="measured latency may exceed the budget by this fraction")
    allocator_cost: Literal["importance", "sensitivity"] = Field(
        "importance", description="the latency allocator's accuracy cost: the importance criterion's scores, or "
                                  "the measured loss increase of each group narrowed alone (4 calibration batches)")
    allocator_refit_groups: bool = Field(
        False, description="re-fit the latency table per group before allocating: each group narrowed alone to "
                           "half its width, measured end to end interleaved with dense, its saving corrected")
    apply: bool = Field(True, description="leave the chosen model in the pipeline")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("width fractions must be in (0, 1]")
        return sorted(set(v))

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if "://" not in v:
            raise ValueError("must be an RDB URL such as sqlite:///search.db or postgresql://host/db")
        scheme, _, rest = v.partition("://")
        dialect, _, driver = scheme.partition("+")
        if dialect == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db; sqlite:// is in memory
            folder = Path(rest[1:] if rest.startswith("/") else rest).parent
            if rest and not folder.is_dir():
                raise ValueError(f"the folder of the SQLite file, {str(folder)!r}, does not exist")
        else:  # Optuna talks to other databases through SQLAlchemy and the database's driver
            drivers = DB_DRIVERS.get(dialect)
            if drivers is None:
                raise ValueError(f"unsupported database {dialect!r} (sqlite, postgresql, mysql)")
            wanted = [driver] if driver else drivers
            if not any(installed(d) for d in wanted):
                raise ValueError(f"{dialect} storage needs a database driver: "
                                 f"pip install {PIP_NAMES.get(wanted[0], wanted[0])}")
        return v

    @model_validator(mode="after")
    def _optuna_installed(self):
        # checked when the recipe is loaded, not after the stages before the search have trained
        if not installed("optuna"):
            raise ValueError("the search stage needs Optuna: pip install 'compress-models[search]'")
        return self

    @model_validator(mode="after")
    def _step(self):
        if self.ratio_step > self.max_ratio:
            raise ValueError("ratio_step must not exceed max_ratio")
        return self

    @property
    def data_free(self) -> bool:
        """The proxy needs no data, so neither the fine-tune nor the accuracy columns run."""
        return self.proxy.kind == "kept_importance"
