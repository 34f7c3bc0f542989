"""Re-parameterisable (RepVGG/MobileOne-style) blocks: pruned as they are, the training-time branches
lose the same channels, so they still fuse to one equivalent conv; with ``reparameterize: true``
they are fused first (the block's own method) and the fused conv is pruned, exported and reloaded."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress import api
from compress.deploy.onnx_io import onnx_export, parity
from compress.model_io import load_portable, save_portable

torch.set_num_threads(1)


def _conv_bn(conv: nn.Conv2d | None, bn: nn.BatchNorm2d, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A branch as one 3x3 kernel and bias (identity when ``conv`` is None)."""
    if conv is None:
        w = torch.zeros(channels, channels, 3, 3)
        w[range(channels), range(channels), 1, 1] = 1.0
    else:
        w = nn.functional.pad(conv.weight, [(3 - conv.kernel_size[0]) // 2] * 4)
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return w * scale[:, None, None, None], bn.bias - bn.running_mean * scale


class RepBlock(nn.Module):
    """conv3x3+BN, conv1x1+BN and identity BN summed; ``reparameterize()`` fuses them (timm's name)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        if hasattr(self, "fused"):
            return torch.relu(self.fused(x))
        return torch.relu(self.conv3(x) + self.conv1(x) + self.identity(x))

    @torch.no_grad()
    def reparameterize(self):
        c = self.conv3[0].out_channels
        parts = [_conv_bn(self.conv3[0], self.conv3[1], c), _conv_bn(self.conv1[0], self.conv1[1], c),
                 _conv_bn(None, self.identity, c)]
        self.fused = nn.Conv2d(c, c, 3, padding=1)
        self.fused.weight.copy_(sum(w for w, _ in parts))
        self.fused.bias.copy_(sum(b for _, b in parts))
        del self.conv3, self.conv1, self.identity


def rep_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), RepBlock(16), RepBlock(16),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    for mod in m.modules():  # statistics that do not match the weights, as after training
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1), mod.running_var.uniform_(0.5, 2), mod.weight.data.uniform_(0.5, 1.5)
    return m.eval()


def test_pruned_branches_still_fuse_to_an_equivalent_conv():
    m, x = rep_net(), torch.randn(2, 3, 12, 12)
    res = api.prune(m, x[:1], ratio=0.5, guards={"round_to": None})
    assert res.metrics["reparameterizable"] == ["3", "4"] and m[3].conv3[0].out_channels < 16
    fused = copy.deepcopy(m)
    fused[3].reparameterize(), fused[4].reparameterize()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), atol=1e-5, rtol=1e-5)


def test_fused_first_then_pruned_exported_and_reloaded(tmp_path):
    m, x = rep_net(), torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        dense = m(x)
    res = api.prune(m, x[:1], ratio=0.5, reparameterize=True, guards={"round_to": None})
    assert res.metrics["reparameterized"] == [{"module": "3", "method": "reparameterize"},
                                              {"module": "4", "method": "reparameterize"}]
    assert not hasattr(m[3], "conv3") and m[3].fused.out_channels < 16 and res.params_after < res.params_before
    assert m(x).shape == dense.shape
    r = onnx_export(m, (3, 12, 12), tmp_path / "m.onnx", exporter="torchscript")
    assert parity(m, r.path, x)["parity_max_abs_error"] < 1e-4
    save_portable(m, tmp_path / "ckpt", f"{__name__}:rep_net", {}, [3, 12, 12])
    back = load_portable(tmp_path / "ckpt", trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))


def test_reparameterize_without_such_blocks_is_refused():
    from compress.errors import InputError

    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    with pytest.raises(InputError, match="reparameterize"):
        api.prune(m, torch.randn(1, 3, 8, 8), ratio=0.5, reparameterize=True)


def test_timm_mobileone_fused_then_pruned(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("mobileone_s0", pretrained=False, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    res = api.prune(m, x[:1], ratio=0.5, reparameterize=True)
    assert len(res.metrics["reparameterized"]) > 10 and res.params_after < 0.8 * res.params_before
    r = onnx_export(m, (3, 32, 32), tmp_path / "m.onnx", exporter="torchscript")
    assert parity(m, r.path, x)["parity_max_rel_error"] < 1e-4
