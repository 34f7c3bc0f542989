"""Building models from recipe specs, loading user checkpoints safely, and the portable
checkpoint format: ``arch.json`` (factory, kwargs, per-module structural attributes) plus
``model.safetensors``. A pruned model is rebuilt from the factory, its modules' structural
attributes are restored, tensors are re-allocated at their saved shapes, and the weights loaded:
no pickle anywhere."""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import zoo
from .errors import EnvironmentFailure, InputError, first_line, is_out_of_memory
from .extras import install_hint
from .io import atomic_write_bytes, atomic_write_json
from .modules import ORIGIN_ATTR, replace_submodule
from .registry import import_callable
from .sparsity.masks import install_mask_hooks

ARCH_FORMAT = 1
_SIMPLE = (int, float, bool, str)


def resolve_factory(spec: str, field: str = "model.factory"):
    if ":" not in spec:
        return zoo.MODELS.get(spec, field=field)
    return import_callable(spec, field=field)


def factory_path(spec: str) -> str:
    """Canonical ``module:callable`` for a factory spec (bare zoo names expand)."""
    return spec if ":" in spec else f"compress.zoo:{spec}"


def _kwargs_field(field: str) -> str:
    """``model.factory`` -> ``model.kwargs`` (``arch.factory`` -> ``arch.kwargs``)."""
    return field.rpartition(".")[0] + ".kwargs" if "." in field else "kwargs"


def factory_failure(exc: Exception, spec: str, field: str = "model.factory",
                    doing: str = "building the model") -> Exception:
    """The one-line error for an exception raised by the user's model code (its factory or its
    forward): out of memory is the machine (:class:`EnvironmentFailure`, exit 4); a missing optional
    extra names the ``pip install``; anything else is the model's input error naming ``field``."""
    if isinstance(exc, (InputError, EnvironmentFailure)):
        return exc
    if is_out_of_memory(exc):
        msg = re.sub(r"\[enforce fail at [^\]]*\] (err == 0\. )?", "", first_line(exc))
        return EnvironmentFailure(f"{field}: out of memory {doing} ({spec!r}): {msg}")
    hint = install_hint(exc)
    if hint:
        return InputError(f"{spec!r} needs an optional extra: {hint}", field=field)
    return InputError(f"{doing} ({spec!r}) raised {first_line(exc)}", field=field)


def build_model(spec: str, kwargs: dict[str, Any] | None = None, field: str = "model.factory") -> nn.Module:
    """Call the factory a recipe (or ``arch.json``) names. Whatever the user's factory raises
    becomes one line naming the field (kwargs it rejects: ``model.kwargs``; out of memory: exit 4)."""
    fn = resolve_factory(spec, field)
    kwargs = dict(kwargs or {})
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise InputError(f"factory {spec!r} rejected its kwargs: {exc}", field=_kwargs_field(field)) from None
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        if signature is None and "argument" in str(exc):
            raise InputError(f"factory {spec!r} rejected its kwargs: {exc}", field=_kwargs_field(field)) from None
        raise factory_failure(exc, spec, field) from None
    except Exception as exc:
        raise factory_failure(exc, spec, field) from None
    if not isinstance(model, nn.Module):
        raise InputError(f"factory {spec!r} did not return an nn.Module (got {type(model).__name__})", field=field)
    set_origin(model, spec, kwargs)
    return model


def set_origin(model: nn.Module, factory: str, kwargs: dict[str, Any], input_shape=None) -> None:
    """Record how ``model`` was built (see :data:`ORIGIN_ATTR`); a factory may have recorded a
    more portable recipe of itself already (Hugging Face: its config), which is kept."""
    old = getattr(model, ORIGIN_ATTR, None) or {}
    new = {"factory": factory_path(factory), "kwargs": dict(kwargs), "input_shape": input_shape}
    if old.get("portable"):
        new.update(factory=old["factory"], kwargs=old["kwargs"], portable=True)
    if input_shape is None:
        new["input_shape"] = old.get("input_shape")
    model.__dict__[ORIGIN_ATTR] = new


def read_state_dict(path: str | Path, field: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """Load weights without unpickling arbitrary objects: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file {str(path)!r} does not exist", field=field)
    import pickle
    import warnings

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"cannot read {str(path)!r} safely: it holds objects other than tensors "
                         "(refusing to unpickle; save a state_dict or safetensors)", field=field) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read {str(path)!r} safely: {first}", field=field) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    elif isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{str(path)!r} does not hold a state dict of tensors", field=field)
    return sd


def load_weights(model: nn.Module, path: str | Path, field: str = "model.checkpoint") -> None:
    sd = read_state_dict(path, field)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        msg = " ".join(line.strip() for line in first[:2])
        raise InputError(f"weights in {str(path)!r} do not fit the model: {msg[:300]}", field=field) from None


def build_with_checkpoint(factory: str, kwargs: dict[str, Any] | None, checkpoint: str | None) -> nn.Module:
    """The recipe's model: ``factory(**kwargs)``, then ``checkpoint`` — a weights file
    (safetensors / ``.pt`` weights only) loaded into it, or a folder written by ``compress.save``
    or a run's ``stages/NN-kind/`` (arch.json + safetensors), whose pruned widths and masks are kept.
    A folder must name the recipe's own factory: it is rebuilt with that factory and nothing else."""
    if checkpoint is not None and Path(checkpoint).expanduser().is_dir():
        folder = Path(checkpoint).expanduser()
        if not (folder / "arch.json").is_file():
            raise InputError(f"folder {checkpoint!r} holds no arch.json (give a weights file, or a folder written by "
                             "compress.save)", field="model.checkpoint")
        arch = read_arch(folder, trust_code=True)  # read, not called: compared with the recipe's factory
        if factory_path(arch["factory"]) != factory_path(factory):
            raise InputError(f"{str(folder / 'arch.json')!r} names factory {arch['factory']!r}, not the recipe's "
                             f"{factory_path(factory)!r}", field="model.checkpoint")
        return load_portable(folder, allow=[factory_path(factory)])
    model = build_model(factory, kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def structural_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Simple attributes of every module (channel counts, head counts, shapes): what pruning edits."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        attrs = {}
        for k, v in vars(mod).items():
            if k.startswith("_") and k != "_qkv_same_embed_dim" or k == "training":
                continue
            if isinstance(v, _SIMPLE) or (
                isinstance(v, (tuple, list)) and all(isinstance(i, _SIMPLE) for i in v)
            ):
                attrs[k] = list(v) if isinstance(v, tuple) else v
        replacement = getattr(type(mod), "portable_replacement", None)
        if isinstance(replacement, str):  # a module pruning swapped in: the factory builds the original
            attrs["portable_replacement"] = replacement
        if attrs:
            out[name] = attrs
    return out


def _replace_modules(model: nn.Module, attrs: dict[str, dict[str, Any]]) -> None:
    """Swap in the modules pruning replaced (only compress's own, by name: arch.json is data)."""
    from .structured.attention import SplitMultiheadAttention
    from .structured.reparam import MARK, METHODS

    known = {"split_multihead_attention": (nn.MultiheadAttention, SplitMultiheadAttention.from_torch)}
    modules = dict(model.named_modules())
    for name, record in attrs.items():  # blocks fused before pruning: fused again (the model's own method)
        method = record.get(MARK)
        if method is not None and name in modules:
            if method not in METHODS or not callable(getattr(type(modules[name]), method, None)):
                raise InputError(f"module {name!r}: cannot re-parameterise with {method!r}", field="arch.json")
            getattr(modules[name], method)()
    for name, record in attrs.items():
        kind = record.get("portable_replacement")
        if kind is None or not name:
            continue
        if kind not in known:
            raise InputError(f"module {name!r}: unknown replacement {kind!r}", field="arch.json")
        original, convert = known[kind]
        mod = model.get_submodule(name) if name in dict(model.named_modules()) else None
        if isinstance(mod, original):
            replace_submodule(model, name, convert(mod))


def _restore_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]]) -> None:
    modules = dict(model.named_modules())
    for name, record in attrs.items():
        mod = modules.get(name)
        if mod is None:
            continue
        for k, v in record.items():
            if not hasattr(mod, k):
                continue
            cur = getattr(mod, k)
            setattr(mod, k, tuple(v) if isinstance(cur, tuple) else v)


def _reshape_to(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Re-allocate parameters/buffers whose saved shape differs (pruned), register missing buffers
    (masks), so ``load_state_dict(strict=True)`` then fills every tensor."""
    modules = dict(model.named_modules())
    for key, tensor in sd.items():
        mod_name, _, leaf = key.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None:
            continue
        if leaf in mod._parameters and mod._parameters[leaf] is not None:
            p = mod._parameters[leaf]
            if p.shape != tensor.shape:
                mod._parameters[leaf] = nn.Parameter(torch.empty_like(tensor), requires_grad=p.requires_grad)
        elif leaf in mod._buffers and mod._buffers[leaf] is not None:
            if mod._buffers[leaf].shape != tensor.shape:
                mod._buffers[leaf] = torch.empty_like(tensor)
        elif not hasattr(mod, leaf):
            mod.register_buffer(leaf, torch.empty_like(tensor))


def save_portable(model: nn.Module, directory: str | Path, factory: str, kwargs: dict[str, Any],
                  input_shape: list[int] | None, extra: dict[str, Any] | None = None) -> None:
    """Write ``arch.json`` + ``model.safetensors`` (atomically, weights first)."""
    from safetensors.torch import save

    directory = Path(directory)
    origin = getattr(model, ORIGIN_ATTR, None) or {}
    if origin.get("portable") and factory_path(origin["factory"]) == factory_path(factory):
        kwargs = origin["kwargs"]  # e.g. a Hugging Face config instead of the directory it came from
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / "model.safetensors", save(sd))
    arch = {
        "format": ARCH_FORMAT,
        "factory": factory_path(factory),
        "kwargs": kwargs,
        "input_shape": input_shape,
        "modules": structural_attrs(model),
        "extra": extra or {},
    }
    atomic_write_json(directory / "arch.json", arch)


# ---------------------------------------------------------------------------------------------
# Reading a portable checkpoint someone else wrote: arch.json is data, not code.

def is_zoo_factory(spec: str) -> bool:
    """A bare zoo name or ``compress.zoo:<registered name>``: building it runs no code from elsewhere."""
    if ":" not in spec:
        return spec in zoo.MODELS
    module, _, attr = spec.partition(":")
    return module == "compress.zoo" and attr in zoo.MODELS


def factory_allowed(spec: str, allow=(), trust_code: bool = False) -> bool:
    """Whether a factory named in an ``arch.json`` may be imported and called: the zoo; anything with
    ``trust_code``; or a match in ``allow`` — a module prefix (``"mypkg"`` allows ``mypkg.models:net``)
    or an exact ``module:callable``."""
    if trust_code or is_zoo_factory(spec):
        return True
    if ":" not in spec:
        return False
    module = spec.partition(":")[0]
    for entry in allow or ():
        entry = str(entry)
        if ":" in entry:
            if factory_path(entry) == spec:
                return True
        elif module == entry or module.startswith(entry + "."):
            return True
    return False


def _parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def read_json_file(path: str | Path, what: str = "JSON") -> Any:
    """A JSON file of a run directory or checkpoint; an InputError naming the file when it is
    missing, unreadable or damaged."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file does not exist", field=str(path))
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"damaged: not valid {what} ({exc.msg}, line {exc.lineno} column {exc.colno})",
                         field=str(path)) from None
    except UnicodeDecodeError:
        raise InputError(f"damaged: not valid {what} (not UTF-8 text)", field=str(path)) from None
    except OSError as exc:
        raise InputError(f"cannot read it: {exc.strerror or exc}", field=str(path)) from None


def check_safetensors(path: str | Path) -> None:
    """Check a ``.safetensors`` file's header and that the file holds every byte the header
    promises (a truncated copy fails here, naming the file), without reading the tensors."""
    import struct

    path = Path(path)
    if not path.is_file():
        raise InputError("file does not exist", field=str(path))
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("truncated inside its header")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputError(f"damaged: not a readable safetensors file ({str(exc).splitlines()[0][:120]})",
                         field=str(path)) from None
    if size < 8 + n + end:
        raise InputError(f"damaged: truncated ({size} bytes of {8 + n + end})", field=str(path))


def read_arch(directory: str | Path, allow=(), trust_code: bool = False) -> dict[str, Any]:
    """``arch.json`` of a portable checkpoint, checked: format, fields, and a factory that may be
    called (see :func:`factory_allowed`); refusing names the file and how to allow it."""
    arch_path = Path(directory) / "arch.json"
    arch = read_json_file(arch_path, "JSON")
    if not isinstance(arch, dict):
        raise InputError("damaged: not a JSON object", field=str(arch_path))
    if arch.get("format") != ARCH_FORMAT:
        raise InputError(f"unsupported format {arch.get('format')!r} (expected {ARCH_FORMAT})", field=str(arch_path))
    factory, kwargs = arch.get("factory"), arch.get("kwargs") or {}
    if not isinstance(factory, str) or not factory or not isinstance(kwargs, dict) \
            or not isinstance(arch.get("modules", {}), dict) \
            or not all(isinstance(v, dict) for v in arch.get("modules", {}).values()):
        raise InputError("damaged: 'factory' must be a string, 'kwargs' and 'modules' objects", field=str(arch_path))
    if not factory_allowed(factory, allow, trust_code):
        module = factory.partition(":")[0]
        raise InputError(f"factory {factory!r} is not a model-zoo factory; loading would import and call it "
                         f"(a run directory is data, not code). If you trust this directory, allow it: "
                         f"compress.load(..., allow=[{module.split('.')[0]!r}]) or trust_code=True; "
                         f"--trust-code on the command line", field=str(arch_path))
    return arch


def verify_portable(directory: str | Path, allow=(), trust_code: bool = False) -> None:
    """Everything :func:`load_portable` can check without building the model: both files exist,
    ``arch.json`` parses and names an allowed factory, the weights are not truncated."""
    read_arch(directory, allow, trust_code)
    check_safetensors(Path(directory) / "model.safetensors")


def load_portable(directory: str | Path, allow=(), trust_code: bool = False) -> nn.Module:
    """Rebuild a (possibly pruned, masked) model from a portable checkpoint directory.

    ``arch.json`` names the factory that builds the model. Only model-zoo factories are called
    unless ``trust_code`` is set or ``allow`` names the factory's module (prefix) or the exact
    ``module:callable``: a tampered ``arch.json`` must not run arbitrary code. A damaged file is an
    InputError naming it."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / "model.safetensors"
    arch = read_arch(directory, allow, trust_code)
    check_safetensors(weights)
    try:
        model = build_model(arch["factory"], arch.get("kwargs") or {}, field=str(directory / "arch.json"))
    except InputError as exc:
        module = arch["factory"].partition(":")[0]
        if not any(f"No module named {m!r}" in str(exc) for m in _parents(module)):
            raise
        raise InputError(f"the model's factory {arch['factory']!r} needs module {module!r}, which is not importable "
                         f"here: put it on PYTHONPATH (or in the working directory), or deploy the portable "
                         f"export instead, model.pt2 from an export stage with pt2: true "
                         f"(torch.export.load, no model code needed)", field=str(directory / "arch.json")) from None
    set_origin(model, arch["factory"], arch.get("kwargs") or {}, arch.get("input_shape"))
    _replace_modules(model, arch.get("modules", {}))
    _restore_attrs(model, arch.get("modules", {}))
    try:
        sd = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise InputError(f"damaged: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                         field=str(weights)) from None
    _reshape_to(model, sd)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise InputError(f"the weights do not fit the model arch.json describes: {msg[:300]}",
                         field=str(weights)) from None
    install_mask_hooks(model)  # masks hold in the caller's own training loop too
    model.eval()
    return model
