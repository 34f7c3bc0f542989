"""The base of every recipe model (:class:`Strict`), the model block (:class:`ModelConfig`) and
small validators shared by several configs. Each wing keeps its own config beside its code
(``train/config.py``, ``data/config.py``, each stage's ``Config``).

Every model forbids unknown keys, so a typo in a recipe is an error that names the field rather
than a silently ignored setting.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import zoo


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def require_exactly_one(model, *names: str):
    """For 'one of these alternatives' blocks (``{iterations|epochs}``, ``{macs|params}``)."""
    if sum(getattr(model, n) is not None for n in names) != 1:
        raise ValueError(f"give exactly one of {' or '.join(names)}")
    return model


class ModelConfig(Strict):
    factory: str = Field(..., description="'module:callable', or a bare name from compress.zoo")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Optional[str] = Field(None, description="trained weights: .safetensors, or .pt loaded weights_only")
    input_shape: list[int] = Field(..., description="one sample, no batch dim, e.g. [3, 32, 32]")

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        if ":" in v:
            mod, _, attr = v.partition(":")
            if not mod or not attr:
                raise ValueError(f"expected 'module:callable', got {v!r}")
        elif v not in zoo.MODELS:
            raise ValueError(f"unknown zoo model {v!r} (known: {', '.join(zoo.MODELS.names())})")
        return v

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if not v or any(d < 1 for d in v):
            raise ValueError("must be a non-empty list of positive ints")
        return v
