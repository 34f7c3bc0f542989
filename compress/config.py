"""The base of every recipe model (:class:`Strict`), the model block (:class:`ModelConfig`) and
small validators shared by several configs. Each wing keeps its own config beside its code
(``train/config.py``, ``data/config.py``, each stage's ``Config``).

Every model forbids unknown keys, so a typo in a recipe is an error that names the field rather
than a silently ignored setting; every float field refuses NaN and infinities, and every int field
refuses values beyond a 32-bit int (code below passes them to C: an overflow, or an allocation that
cannot succeed), so a value the schema accepts is one the code can use.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from . import zoo

MAX_INT = 2**31 - 1  # the largest int a recipe field takes (model.kwargs, free-form, is not checked)


def _free_form(annotation: Any) -> bool:
    """Whether a field's type holds user values the schema does not type (``dict[str, Any]``)."""
    return annotation is Any or any(_free_form(a) for a in get_args(annotation))


def _too_large(value: Any) -> Union[int, None]:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return value
    if isinstance(value, (list, tuple)):
        return next((v for v in map(_too_large, value) if v is not None), None)
    if isinstance(value, dict):
        return next((v for v in map(_too_large, value.values()) if v is not None), None)
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_ints(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and not _free_form(field.annotation):
            big = _too_large(v)
            if big is not None:
                raise ValueError(f"{big} is too large (the limit is {MAX_INT:,})")
        return v


def require_exactly_one(model, *names: str):
    """For 'one of these alternatives' blocks (``{iterations|epochs}``, ``{macs|params}``)."""
    if sum(getattr(model, n) is not None for n in names) != 1:
        raise ValueError(f"give exactly one of {' or '.join(names)}")
    return model


HF_FACTORY = "hf_pretrained"


class ModelConfig(Strict):
    factory: str = Field(..., description="'module:callable', or a bare name from compress.zoo")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Optional[str] = Field(None, description="trained weights: .safetensors, or .pt loaded weights_only; "
                                                        "or a folder from compress.save / a run's stages/NN-kind "
                                                        "(pruned widths and masks kept)")
    input_shape: Optional[list[int]] = Field(
        None, description="one sample, no batch dim, e.g. [3, 32, 32]; may be left out when the data's inputs are "
                          "not one tensor (a dict such as input_ids + attention_mask, or a tuple): checks, MAC counts "
                          "and exports then use a real batch; with hf, image models default to "
                          "[num_channels, image_size, image_size]")
    hf: Optional[str] = Field(None, description="a local Hugging Face save_pretrained directory (safetensors, "
                                                "transformers' key names) instead of factory; never downloads")
    task: Optional[Literal["image-classification", "semantic-segmentation", "sequence-classification"]] = Field(
        None, description="with hf: the head, when config.json names no architecture")

    @model_validator(mode="before")
    @classmethod
    def _hf_directory(cls, data: Any) -> Any:
        """``hf: DIR`` is ``factory: hf_pretrained, kwargs: {path: DIR, task: ...}`` (what the
        resolved recipe.yaml records, beside ``hf``)."""
        if not isinstance(data, dict) or data.get("hf") is None:
            return data
        data = dict(data)
        if data.get("factory", HF_FACTORY) != HF_FACTORY:
            raise ValueError("give factory or hf, not both")
        if not isinstance(data["hf"], str):
            raise ValueError("hf must be a directory path")
        data["factory"] = HF_FACTORY
        data["kwargs"] = {**(data.get("kwargs") or {}), "path": data["hf"], "task": data.get("task")}
        if data.get("input_shape") is None:
            config = Path(data["hf"]).expanduser() / "config.json"
            try:
                c = json.loads(config.read_text())
                size = c["image_size"]
                data["input_shape"] = [int(c.get("num_channels", 3)), int(size), int(size)]
            except (OSError, ValueError, KeyError, TypeError):
                raise ValueError(f"input_shape is required (no image_size in {str(config)!r})") from None
        return data

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
    def _shape(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or any(d < 1 for d in v)):
            raise ValueError("must be a non-empty list of positive ints")
        return v
