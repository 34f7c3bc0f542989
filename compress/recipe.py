"""The recipe: a YAML file validated into pydantic models. This is the contract CI and other tools
rely on; extend it, never rename fields.

Errors name the field path (``stages[2].ratio``) and the YAML line, in one line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from .config import ModelConfig, Strict
from .data.config import DataConfig
from .errors import InputError
from .stages import STAGES
from .stages.artifacts import HOW, ONNX, ONNX_INT8, TEACHER


class Gates(Strict):
    """Judged after the last stage; a failed gate exits 3 (see compress.pipeline.gates). The
    accuracy-drop and parity gates are on by default, ``null`` turns one off; a NaN or infinite
    value fails its gate."""

    max_accuracy_drop: Optional[float] = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="percentage points, dense - final on the test split (default on); also fails a final model "
                    "at chance level")
    min_accuracy: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False,
                                          description="percent: an absolute floor for the final model's accuracy")
    min_speedup: Optional[float] = Field(None, gt=0, allow_inf_nan=False,
                                         description="compressed vs dense, first backend, first batch size")
    max_parity_error: Optional[float] = Field(
        1e-4, gt=0, allow_inf_nan=False,
        description="max |ONNX Runtime - torch| (default on when the recipe exports; not applicable without export)")
    max_int8_accuracy_drop: Optional[float] = Field(
        None, ge=0, allow_inf_nan=False,
        description="percentage points, int8 ONNX (export.onnx.int8) vs the compressed fp32 model")


def _stage_union():
    configs = tuple(STAGES.get(k).config for k in STAGES.names())
    return Annotated[Union[configs], Field(discriminator="kind")]  # type: ignore[valid-type]


StageUnion = _stage_union()


class Recipe(Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[StageUnion] = Field(default_factory=list)  # type: ignore[valid-type]
    gates: Gates = Field(default_factory=Gates)

    @model_validator(mode="after")
    def _checks(self):
        if self.model.checkpoint is not None and not Path(self.model.checkpoint).expanduser().is_file():
            raise InputError(f"file {self.model.checkpoint!r} does not exist", field="model.checkpoint")
        self._check_stage_order()
        return self

    def _check_stage_order(self) -> None:
        """Check the stages against what each declares it needs, provides and conflicts with (see
        :class:`compress.stages.StageConfig`), once, before anything runs: an impossible order is
        an input error naming the stage, not a failure after the training stages."""
        available: set[str] = set()
        for i, st in enumerate(self.stages):
            if st.changes_structure:
                available.add(TEACHER)  # the runner records it just before the first such stage
            for artifact, why in st.conflicts().items():
                if artifact in available:
                    raise InputError(f"a {st.kind} stage cannot follow the {artifact} of an earlier stage: {why}",
                                     field=f"stages[{i}].kind")
            for artifact, field in st.needs().items():
                if artifact not in available:
                    raise InputError(f"the {st.kind} stage needs the {artifact}: {HOW[artifact]}",
                                     field=f"stages[{i}].{field}")
            available |= st.provides()
        gate_needs = {"max_parity_error": ONNX, "max_int8_accuracy_drop": ONNX_INT8}
        for gate, artifact in gate_needs.items():
            if getattr(self.gates, gate) is None or artifact in available:
                continue
            if gate in self.gates.model_fields_set:  # set by the user: the recipe cannot satisfy it
                raise InputError(f"the gate needs the {artifact}: {HOW[artifact].replace(' before this one', '')}",
                                 field=f"gates.{gate}")
            # a default that cannot apply: resolved to null, reported as not applicable (and the
            # resolved recipe.yaml validates again)
            self.gates.__dict__[gate] = None


# ---------------------------------------------------------------------------------------------
# Loading, overrides, and error messages with field paths and YAML lines.

def _loc_to_path(loc: tuple) -> list[Any]:
    """Pydantic locations include discriminator tags (``stages.2.prune.ratio``); drop them."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and out and out[-1] is not None and isinstance(out[-1], int) and \
                len(out) >= 2 and out[-2] == "stages" and part in STAGES:
            continue
        if isinstance(part, str) and part.startswith("function-"):
            continue
        out.append(part)
    return out


def field_path(parts: list[Any]) -> str:
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


def _yaml_line(node: yaml.Node | None, parts: list[Any]) -> int | None:
    """Line (1-based) of the deepest node along ``parts`` in the composed YAML tree."""
    line = None
    for p in parts:
        if node is None:
            break
        line = node.start_mark.line + 1
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(p, str):
            for k, v in node.value:
                if k.value == p:
                    nxt = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and p < len(node.value):
            nxt = node.value[p]
        node = nxt
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _clean_msg(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys: list[Any] = [int(k) if k.lstrip("-").isdigit() else k for k in dotted.split(".")]
    cur: Any = data
    for i, k in enumerate(keys[:-1]):
        nxt_key = keys[i + 1]
        if isinstance(cur, list):
            if not isinstance(k, int) or not -len(cur) <= k < len(cur):
                raise InputError(f"no list element {k}", field=field_path(keys[: i + 1]))
            cur = cur[k]
        else:
            if k not in cur or cur[k] is None:
                cur[k] = [] if isinstance(nxt_key, int) else {}
            cur = cur[k]
    last = keys[-1]
    if isinstance(cur, list):
        if not isinstance(last, int) or not -len(cur) <= last < len(cur):
            raise InputError(f"no list element {last}", field=field_path(keys))
        cur[last] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise InputError("cannot set a field inside a scalar", field=field_path(keys))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set expects PATH=VALUE, got {item!r}", field="--set")
        path, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, path.strip(), value)
    return data


def validate_data(data: Any, root_node: yaml.Node | None = None, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise InputError("a recipe must be a YAML mapping", field=source)
    try:
        return Recipe.model_validate(data)
    except InputError as exc:  # cross-field checks: add the YAML line of the field they name
        if exc.line is None and exc.field:
            parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", exc.field)]
            exc.line = _yaml_line(root_node, parts)
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        parts = _loc_to_path(err["loc"])
        more = len(exc.errors()) - 1
        msg = _clean_msg(err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind {err.get('input', {}).get('kind')!r} (known: {', '.join(STAGES.names())})"
            parts = parts[:2] + ["kind"] if len(parts) >= 2 else parts
        if more:
            msg += f" (+{more} more error{'s' if more > 1 else ''})"
        raise InputError(msg, field=field_path(parts) or source, line=_yaml_line(root_node, parts)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; any problem is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file {str(path)!r} does not exist", field="recipe")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"invalid YAML: {problem}", field=str(path), line=line) from None
    if data is None:
        data = {}
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_data(data, node if not overrides else node)


def recipe_schema() -> dict:
    """JSON Schema of the recipe, for editor completion."""
    return TypeAdapter(Recipe).json_schema()
