"""The recipe: a YAML file validated into pydantic models. This is the contract CI and other tools
rely on; extend it, never rename fields.

Errors name the field path (``stages[2].ratio``) and the YAML line, in one line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from .config import ModelConfig, Strict
from .data.config import DataConfig
from .errors import EnvironmentFailure, InputError
from .registry import add_import_root
from .stages import STAGES
from .stages.artifacts import HOW, ONNX, ONNX_INT8, SNAPSHOTS, TEACHER
from .train.config import TrainLoopConfig
from .tasks.config import TaskConfig


class Gates(Strict):
    """Judged after the last stage; a failed gate exits 3 (see compress.pipeline.gates). The
    accuracy-drop and parity gates are on by default, ``null`` turns one off; a NaN or infinite
    value fails its gate."""

    max_accuracy_drop: Optional[float] = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="percentage points, dense - final on the test split (default on); also fails a final model "
                    "at chance level. The alias of max_metric_drop: it judges the task's primary metric")
    max_metric_drop: Optional[float] = Field(
        None, ge=0, allow_inf_nan=False,
        description="dense - final of the task's primary metric (classification: accuracy %, segmentation: mIoU "
                    "points, custom: its metric); overrides max_accuracy_drop when set")
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


# Names Windows reserves for devices (with any extension): a recipe may travel to such a machine.
_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
# Per-stage seeds are seed * 1000 + stage index (compress.paths.stage_seed) and reach NumPy, whose
# seeds are 32-bit, and scikit-learn, which refuses negative ones.
SEED_LIMIT = 2**32 // 1000
MAX_STAGES = 1000


class Recipe(Strict):
    name: str = Field(..., min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="the run's name; the default run directory is runs/<name>")
    seed: int = Field(0, json_schema_extra={"minimum": 0, "exclusiveMaximum": SEED_LIMIT},
                      description=f"0 <= seed < {SEED_LIMIT} (per-stage seeds, seed * 1000 + stage index, "
                                  "must fit NumPy's 32-bit seeds)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig,
                             description="classification (default), segmentation or custom; a name or a block")
    stages: list[StageUnion] = Field(default_factory=list,  # type: ignore[valid-type]
                                     description=f"one or more stages (at most {MAX_STAGES}), run in order")
    gates: Gates = Field(default_factory=Gates)
    threads: Optional[int] = Field(
        None, ge=1, le=1024, description="intra-op threads for training and evaluation (default: chosen from the "
                                         "idle cores this process may use; see compress.threads); --threads "
                                         "overrides it; benchmark timings keep their own benchmark.threads")

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, v: str) -> str:
        """``name`` is a folder name (runs/<name>): never '.', '..', an option-like or reserved name."""
        if set(v) == {"."}:
            raise ValueError(f"{v!r} is not a folder name of its own (the run would land in runs/{v}); "
                             "use letters, digits, '_', '-' or '.'")
        if v.startswith("-"):
            raise ValueError("must not start with '-' (it would read as a command-line option)")
        if v.split(".")[0].upper() in _RESERVED_NAMES:
            raise ValueError(f"{v!r} is a reserved device name on Windows")
        return v

    @field_validator("seed", mode="after")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < SEED_LIMIT:
            raise ValueError(f"must be 0 <= seed < {SEED_LIMIT} (per-stage seeds, seed * 1000 + stage index, "
                             f"must fit NumPy's 32-bit seeds), got {v}")
        return v

    @field_validator("stages", mode="after")
    @classmethod
    def _not_too_many_stages(cls, v: list) -> list:
        if len(v) > MAX_STAGES:
            raise ValueError(f"at most {MAX_STAGES} stages (per-stage seeds are seed * 1000 + stage index)")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if not self.stages:  # here, not on the field: a missing ``stages:`` is refused too
            raise InputError("a recipe needs at least one stage", field="stages")
        if self.model.checkpoint is not None and not Path(self.model.checkpoint).expanduser().exists():
            raise InputError(f"file {self.model.checkpoint!r} does not exist", field="model.checkpoint")
        self._check_stage_order()
        self._check_precision()
        self._latency_targets_default_to_benchmark()
        for i, st in enumerate(self.stages):
            missing = st.unavailable_here()
            if missing is not None:
                field, why = missing
                raise InputError(f"{why}; mark the stage 'optional: true' to skip it on machines without it",
                                 field=f"stages[{i}].{field}")
        return self

    def _check_precision(self) -> None:
        """fp16 autocast trains only on CUDA (bf16 is the CPU's reduced precision): refuse it before any
        stage runs when the recipe's device is, or resolves to, the CPU."""
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return

        def loops(obj, path):
            if isinstance(obj, TrainLoopConfig):
                yield obj, path
            if isinstance(obj, Strict):
                for name in type(obj).model_fields:
                    value = getattr(obj, name)
                    if isinstance(value, Strict):
                        yield from loops(value, f"{path}.{name}")

        for i, st in enumerate(self.stages):
            for loop, path in loops(st, f"stages[{i}]"):
                if loop.precision == "fp16":
                    raise InputError("fp16 autocast needs a CUDA device and this recipe trains on the CPU; use "
                                     "precision: bf16 (or fp32)", field=f"{path}.precision")

    def _latency_targets_default_to_benchmark(self) -> None:
        """A prune stage's latency target is measured where the recipe benchmarks: unless it names them,
        the first benchmark stage's first backend and batch size, and its threads."""
        bench = next((st for st in self.stages if st.kind == "benchmark"), None)
        for st in self.stages:
            target = getattr(st, "target", None) if st.kind == "prune" else None
            if target is None or getattr(target, "latency", None) is None:
                continue
            defaults = {"backend": bench.backends[0], "batch_size": bench.batch_sizes[0],
                        "threads": bench.threads} if bench is not None else {}
            for key, value in defaults.items():
                if getattr(target, key) is None:
                    target.__dict__[key] = value

    def _check_stage_order(self) -> None:
        """Check the stages against what each declares it needs, provides and conflicts with (see
        :class:`compress.stages.StageConfig`), once, before anything runs: an impossible order is
        an input error naming the stage, not a failure after the training stages."""
        available: set[str] = set()
        made_by: dict[str, tuple[str, int]] = {}  # artifact -> the stage that wrote it first
        for i, st in enumerate(self.stages):
            if st.changes_structure:
                available.add(TEACHER)  # the runner records it just before the first such stage
            stale = sorted(available & SNAPSHOTS)
            if st.changes_model() and stale:
                kind, at = made_by[stale[0]]
                raise InputError(f"a {st.kind} stage after the {kind} stage (stages[{at}]) changes the model its "
                                 f"files describe ({', '.join(stale)}); move the {kind} stage after it",
                                 field=f"stages[{i}].kind")
            for artifact, why in st.conflicts().items():
                if artifact in available:
                    raise InputError(f"a {st.kind} stage cannot follow the {artifact} of an earlier stage: {why}",
                                     field=f"stages[{i}].kind")
            for artifact, field in st.needs().items():
                if artifact not in available:
                    raise InputError(f"the {st.kind} stage needs the {artifact}: {HOW[artifact]}",
                                     field=f"stages[{i}].{field}")
            for artifact in st.provides():
                made_by.setdefault(artifact, (st.kind, i))
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

def _loc_to_path(loc: tuple, data: Any = None, missing: bool = False) -> list[Any]:
    """Pydantic locations include tags that are not in the recipe: the stage kind of the
    discriminated union (``stages.2.prune.ratio``), union members (``rewind.int``), validator
    names. Keep the parts that index into ``data`` (and, for a missing field, its name)."""
    out: list[Any] = []
    cur: Any = data
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and -len(cur) <= part < len(cur):
            cur = cur[part]
        elif missing and i == len(loc) - 1 and isinstance(cur, dict):
            pass  # the missing field's name
        else:
            continue  # a tag
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
    """Set ``a.b.0.c`` in the recipe's data: mapping keys by name, list elements by index. A path
    that goes through a value which is neither a mapping nor a list is an input error naming it."""
    keys = dotted.split(".")
    if any(k.strip() == "" for k in keys):
        raise InputError(f"empty field name in {dotted!r}", field="--set")
    where: list[Any] = []  # the path so far, list indices as ints (for field_path)
    cur: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(cur, list):
            if not re.fullmatch(r"-?[0-9]+", k):
                raise InputError(f"{field_path(where) or 'the recipe'} is a list: use an index "
                                 f"(0 to {len(cur) - 1}), not {k!r}", field=field_path(where + [k]))
            idx = int(k)
            where.append(idx)
            if not -len(cur) <= idx < len(cur):
                raise InputError(f"no list element {idx} (the list has {len(cur)})", field=field_path(where))
        elif isinstance(cur, dict):
            # keys are names; a key the YAML spelled as a number (``1: x``) is found by its number too
            idx = k if k in cur or not re.fullmatch(r"-?[0-9]+", k) or int(k) not in cur else int(k)
            where.append(k)
            if not last and cur.get(idx) is None:  # a missing block: create it
                cur[idx] = [] if re.fullmatch(r"-?[0-9]+", keys[i + 1]) else {}
        else:
            raise InputError(f"{field_path(where)} is {cur!r}, not a mapping or a list: it has no field {k!r}",
                             field=field_path(where + [k]))
        if last:
            cur[idx] = value
        else:
            cur = cur[idx]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set expects PATH=VALUE, got {item!r}", field="--set")
        path, _, raw = item.partition("=")
        path = path.strip()
        try:
            prefix = [int(p) if re.fullmatch(r"[0-9]+", p) else p for p in path.split(".")]
            value = _compose_checked(raw, "--set", prefix)[0] if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw  # not YAML: the text itself
        _set_path(data, path, value)
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
        errors = exc.errors()
        paths = [_loc_to_path(e["loc"], data, missing=e["type"] == "missing") for e in errors]
        # of the first error and its siblings (union members: rewind.int, rewind.RewindConfig.epochs),
        # the one that reaches deepest into the recipe (then a validator's own message) says most
        best = max((i for i, p in enumerate(paths) if p[: len(paths[0])] == paths[0]),
                   key=lambda i: (len(paths[i]), errors[i]["type"] == "value_error"))
        err, parts = errors[best], paths[best]
        more = len(errors) - 1
        msg = _clean_msg(err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind {err.get('input', {}).get('kind')!r} (known: {', '.join(STAGES.names())})"
            parts = parts[:2] + ["kind"] if len(parts) >= 2 else parts
        if more:
            msg += f" (+{more} more error{'s' if more > 1 else ''})"
        raise InputError(msg, field=field_path(parts) or source, line=_yaml_line(root_node, parts)) from None


# A real recipe has a few hundred YAML values; aliases (*name) can make a short file expand to
# billions (the "billion laughs"), which would pass validation and then hang the run.
MAX_YAML_VALUES = 100_000


def _check_yaml_tree(loader: yaml.SafeLoader, root: yaml.Node, source: str, prefix: list[Any]) -> None:
    """Refuse what PyYAML accepts silently: a key given twice in one mapping (YAML keeps the last),
    an alias that contains itself, and aliases that expand to more than MAX_YAML_VALUES values.
    Walks the composed node graph once per node (aliases share nodes), iteratively."""
    expanded: dict[int, int] = {}     # node id -> values it expands to (done)
    open_: set[int] = set()           # nodes on the current path (an alias back to one is a cycle)
    stack: list[tuple[yaml.Node, list[Any], bool]] = [(root, list(prefix), False)]
    while stack:
        node, where, children_done = stack.pop()
        nid = id(node)
        if children_done:
            open_.discard(nid)
            kids = [c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode) else \
                node.value if isinstance(node, yaml.SequenceNode) else []
            expanded[nid] = 1 + sum(expanded[id(c)] for c in kids)
            if expanded[nid] > MAX_YAML_VALUES:
                raise InputError(f"the YAML expands to more than {MAX_YAML_VALUES:,} values through aliases "
                                 f"(*name); a recipe has a few hundred", field=source,
                                 line=node.start_mark.line + 1)
            continue
        if nid in expanded:
            continue
        if nid in open_:
            raise InputError("a YAML alias refers to a value that contains it", field=source,
                             line=node.start_mark.line + 1)
        open_.add(nid)
        stack.append((node, where, True))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((c, where + [i], False) for i, c in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in node.value:
                name: Any = None
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    name = loader.construct_object(k)
                    try:
                        hash(name)
                    except TypeError:
                        name = None
                if name is not None:
                    line = k.start_mark.line + 1
                    if name in seen:
                        twice = f"on lines {seen[name]} and {line}" if source != "--set" else "in the --set value"
                        raise InputError(f"the key is given twice, {twice} (YAML would keep only the last); "
                                         "remove one", field=field_path(where + [str(name)]))
                    seen[name] = line
                stack.append((k, where, False))
                stack.append((v, where + [str(name) if name is not None else "<<"], False))


def _compose_checked(text: str, source: str, prefix: list[Any]) -> tuple[Any, yaml.Node | None]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_yaml_tree(loader, node, source, prefix)
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str, prefix: list[Any] | None = None) -> tuple[Any, yaml.Node | None]:
    """Compose, check (:func:`_check_yaml_tree`) and construct one YAML document; any problem is an
    :class:`InputError` naming ``source`` (or the field under ``prefix``) and the line."""
    try:
        return _compose_checked(text, source, prefix or [])
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"invalid YAML: {problem}", field=source, line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise InputError("invalid YAML: nested too deeply", field=source) from None


def _shown(path: Path) -> str:
    s = str(path)
    return repr(s) if len(s) <= 200 else repr(s[:100] + "..." + s[-60:])


def read_recipe_text(path: Path) -> str:
    """The recipe file's text (UTF-8); a missing, unreadable or binary file is an input error."""
    try:
        if path.is_dir():
            raise InputError(f"{_shown(path)} is a directory, not a recipe file", field="recipe")
        if not path.is_file():
            raise InputError(f"file {_shown(path)} does not exist", field="recipe")
        raw = path.read_bytes()
    except PermissionError:
        raise EnvironmentFailure(f"recipe: cannot read {_shown(path)}: permission denied") from None
    except OSError as exc:  # a name too long, a loop of links, an I/O error
        raise InputError(f"cannot read {_shown(path)}: {exc.strerror or exc}", field="recipe") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         "save it as UTF-8", field=str(path), line=line) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; any problem is an :class:`InputError`."""
    path = Path(path)
    data, node = parse_yaml(read_recipe_text(path), str(path))
    add_import_root(path.parent)  # "module:callable" finds modules beside the recipe
    if data is None:
        raise InputError("the recipe file is empty (it needs name, model and stages)", field=str(path))
    if not isinstance(data, dict):
        raise InputError(f"a recipe must be a YAML mapping (name:, model:, stages:), not a {type(data).__name__}",
                         field=str(path), line=node.start_mark.line + 1 if node is not None else None)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_data(data, node)


def recipe_schema() -> dict:
    """JSON Schema of the recipe, for editor completion."""
    return TypeAdapter(Recipe).json_schema()
