"""Naming modules and tensors of a model: the one pattern rule every recipe field uses
(``ignore``, ``ratios``, ``rates``), and lookups by dotted name.

Pattern rule: a pattern matches a name (a module such as ``layer1.0.conv1`` or a tensor such as
``fc.weight``) when it matches the whole name as a shell-style glob (``features.*``, ``*.fc``), or
names it or one of its parents exactly (``layer1`` matches ``layer1.0.conv1`` and
``layer1.0.conv1.weight``; ``fc`` matches ``fc.weight``). Case-sensitive.
"""
from __future__ import annotations

import fnmatch
import itertools
from typing import Iterable

import torch
from torch import nn

# attribute set on every model compress builds: {"factory", "kwargs", "input_shape"} (and
# "portable": True when the factory recorded a more portable way to rebuild it, e.g. a Hugging
# Face model's config instead of its directory), so ``compress.save(model, dir)`` and the run
# directory's arch.json can name the factory without being told again
ORIGIN_ATTR = "_compress_origin"


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` lives: its first parameter's (or buffer's) device, the CPU for an empty module."""
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def out_width(layer: nn.Module) -> int:
    """Output channels of a Conv layer, output features of a Linear."""
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches ``name`` (see the module docstring for the rule)."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + ".")


def match_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def tensor_owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``"<module>.<param>"`` -> (the owning module, the parameter's attribute name)."""
    mname, _, pname = name.rpartition(".")
    return model.get_submodule(mname), pname


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted) of ``model`` is."""
    owner, leaf = tensor_owner(model, name)
    setattr(owner, leaf, new)


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod, pname = tensor_owner(model, name)
    return getattr(mod, pname)


def output_layer(model: nn.Module) -> str | None:
    """Name of the last Linear (the classifier) in definition order."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    return last
