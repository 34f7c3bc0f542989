"""The recipe's ``task`` block: what the model predicts, how it is trained and scored."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import Strict


class TaskConfig(Strict):
    """``task: classification`` (default), ``task: segmentation`` or a block::

        task: {name: segmentation, ignore_index: 255}
        task: {name: custom, loss: "mymod:loss", metric: "mymod:metric", distill_loss: "mymod:kd"}
    """

    name: Literal["classification", "segmentation", "custom"] = "classification"
    ignore_index: int = Field(255, description="segmentation: label value that is neither trained nor scored")
    loss: Optional[str] = Field(None, description="custom: 'module:callable', loss(outputs, targets) -> scalar tensor")
    metric: Optional[str] = Field(
        None, description="custom: 'module:callable', metric(outputs, targets) -> float per batch (higher is "
                          "better; averaged over samples)")
    distill_loss: Optional[str] = Field(
        None, description="custom: 'module:callable', distill_loss(student_out, teacher_out, targets, distill) -> "
                          "scalar tensor; default alpha * T^2 * KL(logits) + (1 - alpha) * loss")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _custom_fields(self):
        given = [f for f in ("loss", "metric", "distill_loss") if getattr(self, f) is not None]
        if self.name != "custom" and given:
            raise ValueError(f"{given[0]} is for task name: custom (this task is {self.name})")
        if self.name == "custom":
            missing = [f for f in ("loss", "metric") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"task custom needs {' and '.join(missing)} ('module:callable')")
        return self

    @property
    def primary(self) -> str:
        """The metric gates and stage tables judge: accuracy, miou or metric."""
        return {"classification": "accuracy", "segmentation": "miou", "custom": "metric"}[self.name]
