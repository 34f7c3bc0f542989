"""Benchmark backends behind a registry: each turns an ONNX file (or the torch model) into a
:class:`~compress.deploy.timing.Runner` that :func:`~compress.deploy.timing.time_interleaved` times.

A backend factory takes ``(onnx_path, torch_model, input_shape, batch_size, options)`` and raises
:class:`~compress.deploy.timing.BackendUnavailable` when it cannot run on this machine."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..registry import Registry
from ..sparsity.n_m import is_n_m_sparse
from . import tensorrt as trb
from .files import engine_name, int8_onnx_beside
from .inputs import random_inputs, read_inputs
from .onnx_io import ort_session
from .timing import BackendUnavailable, Runner


BACKENDS: Registry[Callable[..., Runner]] = Registry("benchmark backend")


@BACKENDS.register("onnxruntime")
def onnxruntime_runner(onnx_path: str | Path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """ONNX Runtime CPU: fixed thread count, sequential execution, IOBinding (inputs bound once, so
    the timing is the session's compute, not host copies of fresh numpy arrays). Inputs are random
    arrays of the graph's input names, types and shapes (:mod:`~compress.deploy.inputs`; options
    ``dims`` names the sizes of symbolic dimensions other than the batch)."""
    import onnxruntime as ort

    arrays = random_inputs(read_inputs(onnx_path), batch_size, options.get("dims"), input_shape)
    try:
        sess = ort_session(onnx_path, threads=options.get("threads", 1))
    except Exception as exc:  # onnxruntime raises its own types (INVALID_GRAPH, NOT_IMPLEMENTED, ...)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ONNX Runtime cannot load {str(onnx_path)!r}: {first}") from None
    binding = sess.io_binding()
    for name, x in arrays.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")

    def run() -> None:
        sess.run_with_iobinding(binding)

    return run


@BACKENDS.register("onnxruntime_int8")
def onnxruntime_int8_runner(onnx_path: str | Path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """ONNX Runtime CPU on the int8 Q/DQ export beside ``onnx_path`` (``export.onnx.int8``): the
    same session settings as ``onnxruntime``, so the two rows compare fp32 and int8 files."""
    return onnxruntime_runner(int8_onnx_beside(onnx_path), model, input_shape, batch_size, options)


def _torch_device(options: dict):
    import torch

    device = torch.device(options.get("device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("CUDA requested but no GPU is visible")
    return device


def semi_structured_linears(model) -> tuple[list[str], list[dict]]:
    """On CUDA, swap every Linear weight that holds 2:4 along ``in`` for a
    ``torch.sparse.to_sparse_semi_structured`` tensor (cuSPARSELt / CUTLASS sparse kernels).
    Returns (converted layer names, skipped layers with the reason)."""
    from torch import nn
    from torch.sparse import to_sparse_semi_structured

    done, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach()
        if not is_n_m_sparse(w, axis=1):
            continue
        try:
            mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            done.append(name)
        except (RuntimeError, ValueError) as exc:  # shape / dtype / GPU constraints of the kernels
            skipped.append({"layer": name, "reason": str(exc).splitlines()[0][:160]})
    return done, skipped


def _torch_runner(model, input_shape, batch_size: int, options: dict, compiled: bool) -> Runner:
    """PyTorch eager or ``torch.compile``d. On CUDA the model runs in fp16 (the dtype the sparse
    kernels need) and, for the compressed model, 2:4 Linear weights become semi-structured.
    Inputs: option ``example`` (one real item's inputs: a tensor, tuple or dict of tensors, e.g.
    ``input_ids`` + ``attention_mask``) repeated to the batch size, else a random input of
    ``input_shape`` of the kind the model takes."""
    import copy

    import torch

    from ..example_inputs import example_input
    from ..metrics import call_model, repeat_batch, to_device

    if model is None:
        raise BackendUnavailable("the torch backend needs the model in memory")
    device = _torch_device(options)
    torch.set_num_threads(options.get("threads", 1))
    m = copy.deepcopy(model).eval().to(device)
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.float16
        m = m.to(dtype)
        if options.get("semi_structured", True) and options.get("role") == "compressed":
            semi_structured_linears(m)
    example = options.get("example")
    x = repeat_batch(example, batch_size) if example is not None else example_input(model, input_shape, batch_size,
                                                                                      seed=0)
    x = to_device(x, device, float_dtype=dtype)  # token ids and masks stay integers
    if compiled:
        backend = options.get("compile_backend", "inductor")
        mode = options.get("compile_mode", "default") if backend == "inductor" else None
        m = torch.compile(m, backend=backend, mode=mode, dynamic=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        call_model(m, x)  # compile (and autotune) here, not inside the timed calls
    sync()

    def run() -> None:
        with torch.inference_mode():
            call_model(m, x)
        sync()

    return run


@BACKENDS.register("torch")
def torch_runner(onnx_path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """PyTorch eager on the run's device."""
    return _torch_runner(model, input_shape, batch_size, options, compiled=False)


@BACKENDS.register("torch_compile")
def torch_compile_runner(onnx_path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """``torch.compile`` (Inductor) on the run's device; compilation happens before timing."""
    return _torch_runner(model, input_shape, batch_size, options, compiled=True)


@BACKENDS.register("tensorrt")
def tensorrt_runner(onnx_path, model, input_shape, batch_size: int, options: dict) -> Runner:
    """A TensorRT engine built from the ONNX file (SPARSE_WEIGHTS on, precision from options), one
    per precision and batch size, with a timing cache that makes rebuilds fast. Engines and cache
    sit beside the ONNX file, or in ``options["engine_dir"]`` (one subfolder per role: dense and
    compressed files may share a name). With ``options["reuse_engines"]`` an engine already there
    is loaded instead of rebuilt, once its build record says it was built on this GPU model with
    this TensorRT (engines are not portable). Each call runs once and waits for the stream."""
    trt = trb.require_tensorrt()
    root = Path(options["engine_dir"]) if options.get("engine_dir") else Path(onnx_path).parent
    engine_dir = root / options.get("role", "") if options.get("engine_dir") else root
    opts = trb.BuildOptions(precision=options.get("precision", "fp16"), sparse_weights=True,
                            min_batch=1, opt_batch=batch_size, max_batch=batch_size,
                            timing_cache=str(root / "trt.timing.cache"))
    onnx_path = trb.onnx_for_precision(onnx_path, opts.precision, trb.use_strong_typing(trt, opts.typing))
    name = engine_name(onnx_path, opts.precision, batch_size)
    engine = engine_dir / f"{name}.engine"
    if options.get("reuse_engines") and engine.is_file():
        trb.check_engine_here(engine, trt)
    else:
        engine = Path(trb.build_engine(onnx_path, engine_dir, name, opts).engine)
    inputs = random_inputs(read_inputs(onnx_path), batch_size, options.get("dims"), input_shape)
    return trb.EngineRunner(engine, batch_size, cuda_graph=options.get("cuda_graph", False), inputs=inputs)
