"""Random inputs for an ONNX file, built from its graph: every input's name, element type and shape.

Latency does not depend on the values, so no dataset is needed: floats are standard normal,
integers and booleans are 0/1 (valid token ids for any embedding table, a valid attention mask).
Shapes come from the graph. A symbolic or unknown dimension is the batch when it is an input's
first axis (or carries the name of one); other symbolic dimensions are filled from ``dims``
(``{"seq": 128}``, the command line's ``--dim seq=128``) or, for a single-input model, from the
model's recorded ``input_shape``; anything else is an error naming the input and the dimension.
An input whose first axis is fixed keeps its shape; a graph with no dynamic first axis at all has
a static batch, and asking for another batch size is an error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

Dim = int | str | None  # fixed size, symbolic name, or unknown


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...]


def load_graph(path: str | Path):
    """The ONNX model proto at ``path`` without its external weights (the graph is all that is
    read here), or an InputError saying the file is missing or is not an ONNX model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"file {str(path)!r} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{str(path)!r} is not an ONNX model ({first})") from None
    # arbitrary bytes can decode as a protobuf of unknown fields: a real model has a graph
    if proto.ir_version <= 0 or not proto.graph.output:
        raise InputError(f"{str(path)!r} is not an ONNX model (no graph in it)")
    return proto


def read_inputs(path: str | Path) -> list[InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs by old exporters are not).
    Read once per file version: a benchmark asks for every backend, batch size and role, and a
    model without external data is parsed whole."""
    path = Path(path)
    if not path.is_file():
        load_graph(path)  # the one-line error
    st = path.stat()
    return list(_read_inputs(str(path.resolve()), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _read_inputs(path: str, mtime_ns: int, size: int) -> tuple[InputSpec, ...]:
    from onnx import helper

    proto = load_graph(path)
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in inits:
            continue
        if not value.type.HasField("tensor_type"):
            raise InputError(f"input {value.name!r} of {Path(path).name} is not a tensor")
        tensor = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except Exception:
            raise InputError(f"input {value.name!r} of {Path(path).name} has an element type "
                             f"({tensor.elem_type}) that cannot be filled with random values") from None
        dims: list[Dim] = []
        for d in tensor.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    return tuple(specs)


def resolve_shapes(specs: Sequence[InputSpec], batch_size: int, dims: dict[str, int] | None = None,
                   input_shape: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for ``specs`` at ``batch_size`` (the rules in the module docstring)."""
    dims = dict(dims or {})
    batched = [s for s in specs if s.dims and not isinstance(s.dims[0], int)]
    batch_names = {s.dims[0] for s in batched if isinstance(s.dims[0], str)}
    if not batched:
        static = next((s for s in specs if s.dims), None)
        if static is not None and static.dims[0] != batch_size:
            raise InputError(f"input {static.name!r} has a fixed batch size of {static.dims[0]} (exported "
                             f"without a dynamic batch), so batch size {batch_size} cannot run: time it at "
                             f"batch size {static.dims[0]} or export with a dynamic batch")
    shapes = {}
    for s in specs:
        shape = []
        for axis, d in enumerate(s.dims):
            if isinstance(d, int):
                shape.append(d)
            elif axis == 0 or (d is not None and d in batch_names):
                shape.append(batch_size)
            elif d is not None and d in dims:
                shape.append(int(dims[d]))
            elif input_shape is not None and len(specs) == 1 and len(input_shape) == len(s.dims) - 1:
                shape.append(int(input_shape[axis - 1]))
            elif d is not None:
                raise InputError(f"input {s.name!r} has a dynamic dimension {d!r} (axis {axis}): give its size "
                                 f"with --dim {d}=N")
            else:
                raise InputError(f"input {s.name!r} has an unnamed dynamic dimension at axis {axis}: export "
                                 "the model with that dimension fixed or named (then give it with --dim NAME=N)")
        shapes[s.name] = tuple(shape)
    return shapes


def random_inputs(specs: Sequence[InputSpec], batch_size: int, dims: dict[str, int] | None = None,
                  input_shape: Sequence[int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """One random array per input, in graph order, from one generator seeded with ``seed`` (a
    single float input gets exactly ``standard_normal((batch, *shape))``)."""
    shapes = resolve_shapes(specs, batch_size, dims, input_shape)
    rng = np.random.default_rng(seed)
    return {s.name: _fill(rng, s, shapes[s.name]) for s in specs}


def _fill(rng: np.random.Generator, spec: InputSpec, shape) -> np.ndarray:
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    raise InputError(f"input {spec.name!r} has element type {spec.dtype} that cannot be filled with random "
                     "values")
