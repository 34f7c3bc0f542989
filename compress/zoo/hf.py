"""Hugging Face models: a local ``save_pretrained`` directory as the model source, rebuilt from its
config without the network, and ``save_pretrained`` of a pruned model with a config that describes
the pruned widths and head counts.

``hf_pretrained(path=DIR)`` loads the directory with transformers' own ``from_pretrained``
(``local_files_only``: never the Hub), so the checkpoint's key names are transformers' (5.x writes
legacy names such as ``vit.encoder.layer.0.attention.attention.query`` that its loader maps onto
the modules). The model then remembers its config, so compress's portable checkpoint (arch.json)
names ``hf_pretrained(config={...})``, which rebuilds the same architecture from the config alone:
``compress.load`` needs neither the original directory nor the network.

What an HF config can express: one width per config field. ViT has one ``hidden_size``,
``num_attention_heads`` and ``intermediate_size`` for every layer; Segformer one per stage
(``hidden_sizes``, ``num_attention_heads``, ``mlp_ratios``) and a ``decoder_hidden_size``. A pruned
model whose layers differ within what one field covers (global pruning usually leaves each layer
its own MLP width) cannot be described: :func:`save_pretrained` says so (``PretrainedSave.reason``),
still writes the directory, and stores compress's own checkpoint (every width) in its ``compress/``
folder, which ``compress.load(DIR)`` reads.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError
from ..modules import ORIGIN_ATTR
from .registry import MODELS

TASKS = {
    "image-classification": "AutoModelForImageClassification",
    "semantic-segmentation": "AutoModelForSemanticSegmentation",
    "sequence-classification": "AutoModelForSequenceClassification",
}
COMPRESS_FOLDER = "compress"  # inside a save_pretrained directory: compress's own checkpoint


def _quiet(transformers) -> None:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _model_class(transformers, config, task: str | None, field: str):
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if task is None:
        raise InputError("config.json names no architecture transformers knows: give the task "
                         f"({' | '.join(TASKS)})", field=field)
    if task not in TASKS:
        raise InputError(f"unknown task {task!r} (known: {', '.join(TASKS)})", field=field)
    return getattr(transformers, TASKS[task])


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's whole config as JSON data (not the diff against defaults: defaults change between
    versions), naming the model's class as its architecture so it is rebuilt with the same head."""
    data = json.loads(model.config.to_json_string(use_diff=False))
    data["architectures"] = [type(model).__name__]
    return data


@MODELS.register("hf_pretrained")
def hf_pretrained(path: str | None = None, task: str | None = None, config: dict | None = None) -> nn.Module:
    """A transformers model from a local ``save_pretrained`` directory (``path``) or, with its
    random initialisation, from a config dict (``config``, what arch.json records). ``task``
    (``image-classification`` | ``semantic-segmentation`` | ``sequence-classification``) picks the
    head when config.json names no architecture. Never downloads."""
    import transformers

    _quiet(transformers)
    if (path is None) == (config is None):
        raise InputError("give exactly one of path (a save_pretrained directory) or config", field="model.kwargs")
    if config is not None:
        if not isinstance(config, dict) or "model_type" not in config:
            raise InputError("config must be a transformers config dict with a model_type", field="model.kwargs")
        data = dict(config)
        cfg = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        cls = _model_class(transformers, cfg, task, "model.kwargs.task")
        model = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls._from_config(cfg)
    else:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise InputError(f"{str(folder)!r} is not a save_pretrained directory (no config.json)", field="model.hf")
        cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        cls = _model_class(transformers, cfg, task, "model.task")
        model = cls.from_pretrained(str(folder), local_files_only=True)
    model.__dict__[ORIGIN_ATTR] = {"factory": "compress.zoo:hf_pretrained", "portable": True,
                                   "kwargs": {"config": config_dict(model), "task": task}}
    return model


# ---------------------------------------------------------------------------------------------
# save_pretrained of a pruned model

def _heads(module: nn.Module) -> int | None:
    for attr in ("num_attention_heads", "num_heads"):
        v = vars(module).get(attr)
        if isinstance(v, int):
            return v
    return None


def _attention_heads(model: nn.Module, prefix: str) -> list[int]:
    return [h for n, m in model.named_modules() if n.startswith(prefix) and n.endswith("attention")
            for h in [_heads(m)] if h is not None]


def _widths_vit(model: nn.Module, sd: dict) -> tuple[dict[str, Any], dict[str, list]]:
    """Per-layer widths of a ViT and the config values that would describe them (layer 0's)."""
    base = model.base_model_prefix
    hidden = sd[f"{base}.embeddings.cls_token"].shape[-1]
    fc1 = sorted((k for k in sd if k.startswith(f"{base}.") and k.endswith("mlp.fc1.weight")), key=_layer_order)
    mlp = [sd[k].shape[0] for k in fc1]
    heads = _attention_heads(model, f"{base}.")
    widths = {"hidden_size": [hidden], "num_attention_heads": heads, "intermediate_size": mlp}
    return {"hidden_size": hidden, "num_attention_heads": heads[0], "intermediate_size": mlp[0]}, widths


def _widths_segformer(model: nn.Module, sd: dict) -> tuple[dict[str, Any], dict[str, list]]:
    base = model.base_model_prefix
    n = model.config.num_encoder_blocks
    hidden = [sd[f"{base}.stages.{i}.patch_embeddings.proj.weight"].shape[0] for i in range(n)]
    heads = [_attention_heads(model, f"{base}.stages.{i}.") for i in range(n)]
    mlp = [[sd[k].shape[0] for k in sorted(sd, key=_layer_order)
            if k.startswith(f"{base}.stages.{i}.") and k.endswith("mlp.fc1.weight")] for i in range(n)]
    widths = {"hidden_sizes": hidden, "num_attention_heads": heads, "mlp_hidden": mlp}
    proposal = {"hidden_sizes": hidden, "num_attention_heads": [h[0] for h in heads],
                "mlp_ratios": [m[0] // h if m[0] % h == 0 else m[0] / h for m, h in zip(mlp, hidden)]}
    fuse = sd.get("decode_head.linear_fuse.weight")
    if fuse is not None:
        proposal["decoder_hidden_size"] = fuse.shape[0]
        widths["decoder_hidden_size"] = [fuse.shape[0]]
    return proposal, widths


def _layer_order(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


PROPOSERS = {"vit": _widths_vit, "segformer": _widths_segformer}


@dataclass
class PretrainedSave:
    path: Path
    from_pretrained: bool            # whether transformers' from_pretrained(path) rebuilds this model
    reason: str | None               # why not, when it does not
    widths: dict[str, list]          # the pruned widths read from the model
    config_changes: dict[str, Any]   # the config fields written


def _first_shape_mismatch(model: nn.Module, fresh: nn.Module) -> str | None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for k in sorted(set(want) | set(have), key=_layer_order):
        if want.get(k) != have.get(k):
            return f"{k}: pruned {want.get(k)}, config gives {have.get(k)}"
    return None


def save_pretrained(model: nn.Module, directory: str | Path) -> PretrainedSave:
    """``model.save_pretrained(directory)`` (safetensors) with masks baked in and a config that
    describes the pruned widths and head counts, checked by building a model from that config and
    comparing every tensor shape. Where the config cannot describe them (see the module docstring)
    the directory is still written, ``from_pretrained`` is False and ``reason`` names the first
    tensor whose width the config cannot give; compress's own checkpoint (every width) goes to
    ``directory/compress/`` either way, so ``compress.load(directory)`` always works."""
    import transformers

    from ..sparsity.masks import strip

    _quiet(transformers)
    if not isinstance(model, transformers.PreTrainedModel):
        raise InputError(f"not a transformers model ({type(model).__name__})", field="model")
    plain = strip(copy.deepcopy(model)).cpu().eval()
    sd = plain.state_dict()
    model_type = plain.config.model_type
    proposer = PROPOSERS.get(model_type)
    changes, widths, reason = {}, {}, None
    if proposer is None:
        reason = f"compress does not know which config fields hold the widths of model_type {model_type!r}"
    else:
        changes, widths = proposer(plain, sd)
    cfg = copy.deepcopy(plain.config)
    for k, v in changes.items():
        try:
            setattr(cfg, k, v)
        except Exception as exc:  # the config's own validation (Segformer's mlp_ratios are ints)
            reason = reason or f"the config cannot hold {k}={v!r}: {str(exc).splitlines()[-1].strip()[:160]}"
    if reason is None:
        fresh = type(plain)._from_config(copy.deepcopy(cfg))
        reason = _first_shape_mismatch(plain, fresh)
        if reason is not None:
            reason = f"the config cannot describe these widths (one value per field): {reason}"
    if reason is None:
        plain.config = cfg
    else:  # keep the widths where a reader finds them; transformers ignores unknown config fields
        plain.config.compress_pruned_widths = widths
        plain.config.compress_note = ("per-layer widths differ; load with compress.load(DIR) "
                                      "(compress/ holds the checkpoint with every width)")
    directory = Path(directory)
    plain.save_pretrained(str(directory))
    return PretrainedSave(directory, reason is None, reason, widths, changes if reason is None else {})
