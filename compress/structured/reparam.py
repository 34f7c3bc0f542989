"""Re-parameterisable blocks (RepVGG, MobileOne, GhostNet v2/v3, RepViT...): training-time branches
(conv3x3+BN, conv1x1+BN, identity BN) that sum into one conv at deploy time.

Pruned as they are, the branches lose the same channels (the summation couples them in the
dependency graph; ``tests/test_prune_reparam.py`` checks that the pruned branches still fuse to an
equivalent conv). With the prune stage's ``reparameterize: true`` the blocks are fused *first*,
through the model's own method (timm's ``reparameterize()``, the RepVGG/RepGhost convention
``switch_to_deploy()``), and the fused conv is pruned: the deployable form, with no branches left to
keep consistent. The fused model must compute what the branched one did, or it is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelBreakError
from ..metrics import call_model, logits_of

METHODS = ("reparameterize", "switch_to_deploy")  # the names model libraries use for the fusion
MARK = "compress_reparameterized"  # set on each fused module: portable checkpoints fuse it again on load


def find_reparameterizable(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, method) of the outermost modules that fuse themselves."""
    found: list[tuple[str, str]] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(f + ".") for f, _ in found):
            continue
        method = next((m for m in METHODS if callable(getattr(type(mod), m, None))), None)
        if method is not None:
            found.append((name, method))
    return found


@torch.no_grad()
def reparameterize(model: nn.Module, example, tolerance: float = 1e-4) -> list[dict]:
    """Fuse every re-parameterisable block in place (eval mode); returns what was fused. Raises
    ModelBreakError when the fused model's output moved by more than ``tolerance`` relative to the
    largest logit (a block whose fusion is wrong, e.g. one it does not support)."""
    blocks = find_reparameterizable(model)
    if not blocks:
        return []
    was = model.training
    model.eval()
    before = logits_of(call_model(model, example)).float()
    modules = dict(model.named_modules())
    for name, method in blocks:
        getattr(modules[name], method)()
        setattr(modules[name], MARK, method)
    after = logits_of(call_model(model, example)).float()
    model.train(was)
    err = float((after - before).abs().max()) / max(1.0, float(before.abs().max()))
    if not err <= tolerance:
        raise ModelBreakError(f"re-parameterising {blocks[0][0]!r} and {len(blocks) - 1} more block(s) changed the "
                              f"output (max error {err:.3g} relative to the largest logit); prune without "
                              f"reparameterize")
    return [{"module": n, "method": m} for n, m in blocks]
