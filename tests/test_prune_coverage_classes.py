"""Small reproductions (pure torch, no torchvision/timm) of the model classes Torch-Pruning gets wrong,
and what compress does with each: patch the constant forward reads, prune split parts alike, or
leave the group alone and say why, never a traceback and never a model that does not run."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.errors import ModelBreakError
from compress.metrics import logits_of
from compress.structured import pruner as pruning


def _prune(model, shape, ratio=0.5, guards=None):
    torch.manual_seed(0)
    x = torch.randn(1, *shape)
    model.eval()
    ref = tuple(logits_of(model(x)).shape)
    before = sum(p.numel() for p in model.parameters())
    gp = pruning.GuardedPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=ratio, scope="global",
                               guards=guards or pruning.Guards(round_to=None, min_channels=None))
    gp.step()
    pruning.check_model_runs(model, x, ref, gp.output_name)  # raises if it does not run
    return gp, sum(p.numel() for p in model.parameters()) / before


class _HiddenDimReshape(nn.Module):
    """torchvision ViT style: forward reshapes with an attribute holding the residual width."""

    def __init__(self, dim=32):
        super().__init__()
        self.hidden_dim = dim
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        n = x.shape[0]
        x = self.stem(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def test_width_held_in_an_attribute_is_patched_and_reported():
    m = _HiddenDimReshape()
    gp, kept = _prune(m, (3, 16, 16))
    assert m.stem.out_channels < 32 and m.hidden_dim == m.stem.out_channels
    assert {"module": "<model>", "attribute": "hidden_dim", "old": 32, "new": m.stem.out_channels} in gp.patched
    assert kept < 0.8


class _ChunkHalves(nn.Module):
    """CSP / ShuffleNet style: a conv's output is chunked in two halves that go different ways."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.left = nn.Conv2d(16, 16, 3, padding=1)
        self.right = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        a, b = torch.relu(self.bn(self.conv(x))).chunk(2, dim=1)
        x = torch.cat([self.left(a), self.right(b)], 1)
        return self.head(x.mean((2, 3)))


def test_chunked_width_loses_the_same_channels_in_each_half():
    m = _ChunkHalves()
    gp, _ = _prune(m, (3, 8, 8))
    assert m.conv.out_channels < 32 and m.conv.out_channels % 2 == 0
    assert m.left.in_channels == m.right.in_channels == m.conv.out_channels // 2
    assert gp.split_coupled == {"conv": 2}


class _SplitSizes(nn.Module):
    """Mixed-kernel conv style: split with sizes held in an attribute, one conv per part."""

    def __init__(self):
        super().__init__()
        self.splits = [16, 8]
        self.pw = nn.Conv2d(3, 24, 1)
        self.k3 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.k5 = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        a, b = torch.split(self.pw(x), self.splits, dim=1)
        x = torch.cat([self.k3(a), self.k5(b)], 1)
        return self.head(x.mean((2, 3)))


def test_split_sizes_attribute_follows_the_pruned_parts():
    m = _SplitSizes()
    gp, kept = _prune(m, (3, 8, 8))
    assert sum(m.splits) == m.pw.out_channels and m.splits == [m.k3.in_channels, m.k5.in_channels]
    if m.pw.out_channels < 24:
        assert any(p["attribute"] == "splits" for p in gp.patched)


class _ChannelShuffle(nn.Module):
    """ShuffleNet: view/transpose/flatten permutes channels between groups."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.after = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).flatten(1, 2)  # channel shuffle, 2 groups
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, torch.relu(x2)], 1)
        return self.head(self.after(x).mean((2, 3)))


def test_channel_shuffle_never_raises_and_the_model_runs():
    m = _ChannelShuffle()
    gp, _ = _prune(m, (3, 8, 8))  # Torch-Pruning alone: ZeroDivisionError while building the graph
    assert m.after.out_channels <= 16
    for s in gp.skipped:
        assert s["group"] and s["reason"]


class _TokenMixer(nn.Module):
    """MLP-mixer: a Linear acting on the token axis (transposed), next to channel Linears."""

    def __init__(self, tokens=16, dim=24):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.norm = nn.LayerNorm(dim)
        self.token_mix = nn.Sequential(nn.Linear(tokens, 32), nn.GELU(), nn.Linear(32, tokens))
        self.channel_mix = nn.Sequential(nn.Linear(dim, 48), nn.GELU(), nn.Linear(48, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)          # (n, tokens, dim)
        x = x + self.token_mix(self.norm(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mix(self.norm(x))
        return self.head(x.mean(1))


def test_token_mixing_linear_is_not_coupled_to_channels():
    m = _TokenMixer()
    gp, kept = _prune(m, (3, 8, 8))
    assert m.token_mix[2].out_features == 16  # the token count is not a channel width
    assert kept < 0.9


class _LayerScale(nn.Module):
    """poolformer / ConvNeXt style: a per-channel scale parameter reshaped with view(C, 1, 1)."""

    def __init__(self, dim=32):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.mix = nn.Conv2d(dim, dim, 1)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma.view(-1, 1, 1) * self.mix(x)
        return self.head(x.mean((2, 3)))


def test_layer_scale_parameter_follows_the_width():
    m = _LayerScale()
    gp, kept = _prune(m, (3, 8, 8))
    assert m.gamma.numel() == m.stem.out_channels


class _BakedLiteral(nn.Module):
    """A width written as a literal in forward: nothing to patch, so the group stays whole."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.other = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        a = self.conv(x).mean((2, 3)).reshape(x.shape[0], 16)
        return self.head(torch.cat([a, self.other(x).mean((2, 3))], 1))


def test_group_that_cannot_be_cut_is_left_whole_with_the_reason():
    m = _BakedLiteral()
    gp, _ = _prune(m, (3, 8, 8))
    assert m.conv.out_channels == 16 and m.other.out_channels < 16
    (skip,) = gp.skipped
    assert skip["group"] == "conv" and "shape '[1, 16]'" in skip["reason"]


def test_multihead_attention_embed_dim_and_head_dim_stay_consistent():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden_dim = 32
            self.proj = nn.Linear(12, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            x = self.proj(x)
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return self.head(x.reshape(x.shape[0], -1, self.hidden_dim).mean(1))

    m = Enc()
    gp, _ = _prune(m, (5, 12))
    a = m.attn
    assert a.embed_dim == m.proj.out_features and a.head_dim * a.num_heads == a.embed_dim
    assert m.hidden_dim == a.embed_dim


class _SharedWidthAttribute(nn.Module):
    """Two branches of the same width feed one module whose forward reshapes one of them with an
    attribute holding that width (a bias-like constant): the value alone cannot say which branch it
    follows; forward can, when only one branch's new width lets it run."""

    def __init__(self, weak_a: int = 24, weak_b: int = 0, reshape: bool = False):
        super().__init__()
        self.width, self.reshape = 32, reshape
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(16, 32)
        self.head = nn.Linear(64, 4)
        with torch.no_grad():  # weak rows steer the global ranking to cut a and b differently
            self.a.weight[:weak_a].mul_(1e-3)
            self.a.bias[:weak_a].mul_(1e-3)
            self.head.weight[:, :weak_a].mul_(1e-3)
            if weak_b:
                self.b.weight[:weak_b].mul_(1e-3)
                self.b.bias[:weak_b].mul_(1e-3)
                self.head.weight[:, 32:32 + weak_b].mul_(1e-3)
            else:
                self.b.weight.copy_(torch.randn(32, 16).sign() * 0.2 + torch.linspace(0, 0.01, 32)[:, None])

    def forward(self, x):
        if self.reshape:  # runs with any width that divides a's
            a = self.a(x).view(x.shape[0], -1, self.width).flatten(1)
        else:
            a = self.a(x) + x.new_zeros(self.width)  # broadcasts only while width is a's width
        return self.head(torch.cat([a, self.b(x)], 1))


def test_attribute_matching_two_differently_cut_widths_follows_the_one_forward_runs_with():
    m = _SharedWidthAttribute()
    x = torch.randn(2, 16)
    gp = pruning.GuardedPruner(m, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5, scope="global",
                               guards=pruning.Guards(round_to=None, min_channels=None))
    gp.step()
    assert m.width == m.a.out_features < 32 and m.b.out_features not in (32, m.a.out_features)
    assert [(p["attribute"], p["new"], "resolved" in p) for p in gp.patched] == [("width", m.a.out_features, True)]
    assert m(x).shape == (2, 4)


def test_attribute_forward_runs_with_under_two_cut_widths_is_refused_naming_it():
    m = _SharedWidthAttribute(weak_a=8, weak_b=24, reshape=True)  # a -> 24, b -> 8: both divide a's width
    x = torch.randn(2, 16)
    gp = pruning.GuardedPruner(m, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5, scope="global",
                               guards=pruning.Guards(round_to=None, min_channels=None))
    with pytest.raises(ModelBreakError, match=r"module '<model>' attribute 'width' = 32 .*a -> 24, b -> 8.*more than one"):
        gp.step()
    assert m.width == 32 and m(x).shape == (2, 4)  # nothing guessed, and the model still runs
    m = _SharedWidthAttribute(weak_a=8, weak_b=24, reshape=True)  # the advice works: b left whole
    gp = pruning.GuardedPruner(m, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5, scope="global",
                               ignore=["b"], guards=pruning.Guards(round_to=None, min_channels=None))
    gp.step()
    assert m.width == m.a.out_features < 32 and m.b.out_features == 32
