"""Every use of Torch-Pruning internals, in one place.

Torch-Pruning's public API (``DependencyGraph``, ``BasePruner``, the ``Importance`` classes) does
not expose a few things compress needs: the reduce/normalise steps of ``GroupMagnitudeImportance``
(our criteria reuse them so their scores are comparable with Torch-Pruning's), the pruner's
attention-group test and channel-group count (the guards must cut grouped and attention layers the
way the pruner would), and the pruner's record of each layer's initial width (the guards and
``max_ratio`` stay relative to the unpruned model across pruner instances).

Those are private or undocumented, so they live behind these functions, each with a test in
``tests/test_tp_compat.py``, and pyproject pins ``torch-pruning`` to the versions tested
(``TESTED_VERSIONS``). An upgrade that breaks one of them fails those tests, not a user's run.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

TESTED_VERSIONS = ("1.5.", "1.6.")  # keep in step with pyproject's torch-pruning bound


def reduce_and_normalize(importance: "tp.importance.GroupMagnitudeImportance", per_layer: list[torch.Tensor],
                         roots: list, normalizer=None) -> torch.Tensor:
    """Torch-Pruning's group reduction of per-layer scores, then its normaliser (the importance's
    own unless ``normalizer`` is given)."""
    reduced = importance._reduce(per_layer, roots)
    return importance._normalize(reduced, importance.normalizer if normalizer is None else normalizer)


def mean_reduce_mean_normalize(per_layer: list[torch.Tensor], roots: list) -> torch.Tensor:
    """Mean over the group's layers, then divided by its mean (``group_reduction="mean",
    normalizer="mean"``): the scale every compress criterion reports on."""
    reducer = tp.importance.GroupMagnitudeImportance(group_reduction="mean", normalizer="mean")
    return reduce_and_normalize(reducer, per_layer, roots, "mean")


def attention_group(pruner: "tp.pruner.BasePruner", group) -> tuple[bool, list]:
    """(whether the group holds the q/k/v projections of an attention layer, those projections)."""
    return pruner._is_atten_group(group)


def channel_groups(pruner: "tp.pruner.BasePruner", group) -> int:
    """How many equal slices (conv groups, heads) the group's channels come in."""
    return pruner._get_channel_groups(group)


def initial_channels(pruner: "tp.pruner.BasePruner", module: nn.Module, out: bool, default: int) -> int:
    """The width ``module`` had when the pruner was built (outputs, or inputs with ``out=False``)."""
    table = pruner.layer_init_out_ch if out else pruner.layer_init_in_ch
    return table.get(module, default)


def set_initial_channels(pruner: "tp.pruner.BasePruner", module: nn.Module, out_ch: int, in_ch: int) -> bool:
    """Make the pruner measure ``module``'s ratios against these widths (those of the unpruned
    model, when pruning resumes on a model that earlier steps already cut). False when the pruner
    does not track ``module``."""
    if module not in pruner.layer_init_out_ch:
        return False
    pruner.layer_init_out_ch[module], pruner.layer_init_in_ch[module] = out_ch, in_ch
    return True


def pruner_state(pruner: "tp.pruner.BasePruner") -> dict:
    """What a pruner accumulates across steps (step counter, each scope's initial size, the initial
    widths, head counts): enough to continue in a fresh pruner built on the same model."""
    return {"current_step": pruner.current_step,
            "_scope_initial_channels": dict(getattr(pruner, "_scope_initial_channels", {})),
            "layer_init_out_ch": dict(pruner.layer_init_out_ch), "layer_init_in_ch": dict(pruner.layer_init_in_ch),
            "num_heads": dict(pruner.num_heads), "out_channel_groups": dict(pruner.out_channel_groups),
            "in_channel_groups": dict(pruner.in_channel_groups)}


def set_pruner_state(pruner: "tp.pruner.BasePruner", state: dict) -> None:
    for key, value in state.items():
        if hasattr(pruner, key):
            setattr(pruner, key, value if not isinstance(value, dict) else dict(value))
