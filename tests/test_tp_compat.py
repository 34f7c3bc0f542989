"""compress.structured.tp_compat against the installed Torch-Pruning: one test per function, on
real (tiny) models and real dependency groups, so a Torch-Pruning upgrade that moves one of the
private attributes or methods it wraps fails here, not in a user's run."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.structured import tp_compat

REPO = Path(__file__).resolve().parents[1]


class ConvNet(nn.Module):
    """Plain conv -> plain conv -> grouped conv (4 groups) -> depthwise conv, each with BN."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.dw, self.bn4 = nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.dw(x)))
        return self.fc(x.mean((2, 3)))


class QKVAttention(nn.Module):
    """Separate q/k/v projections split into ``num_heads`` heads (the Hugging Face layout)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):
            return t.view(b, n, self.num_heads, -1).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        a = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
        return self.o_proj((a @ v).transpose(1, 2).reshape(b, n, -1))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = QKVAttention(16, 4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        return self.fc(h.mean(1))


def _conv_pruner(model: ConvNet, ratio: float = 0.5):
    torch.manual_seed(0)
    return tp.pruner.BasePruner(model, torch.randn(1, 3, 8, 8), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=ratio, ignored_layers=[model.fc])


def _attn_pruner(model: TinyTransformer):
    a = model.attn
    return tp.pruner.BasePruner(model, torch.randn(2, 5, 8), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=0.25, ignored_layers=[model.fc],
                                num_heads={a.q_proj: 4, a.k_proj: 4, a.v_proj: 4})


def _out_group(pruner, module):
    fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
    return pruner.DG.get_pruning_group(module, fn, idxs=[0])


def _widths(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Conv2d):
        return m.out_channels, m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    return m.num_features, m.num_features  # BatchNorm


def test_installed_torch_pruning_is_a_tested_version():
    assert tp.__version__.startswith(tp_compat.TESTED_VERSIONS), (
        f"torch-pruning {tp.__version__} is not among tp_compat.TESTED_VERSIONS {tp_compat.TESTED_VERSIONS}: "
        "run tests/test_tp_compat.py against it, then widen TESTED_VERSIONS and the pyproject bound together")


def test_pyproject_bound_admits_exactly_the_tested_minor_versions():
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"torch-pruning>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
    assert m, "pyproject must bound torch-pruning from both sides (see compress/structured/tp_compat.py)"
    lo, hi = (int(m[1]), int(m[2])), (int(m[3]), int(m[4]))
    tested = sorted(tuple(int(x) for x in v.rstrip(".").split(".")) for v in tp_compat.TESTED_VERSIONS)
    assert tested[0] == lo and all(lo <= v < hi for v in tested), (lo, hi, tested)
    assert (tested[-1][0], tested[-1][1] + 1) == hi, f"the upper bound {hi} admits untested versions ({tested})"


def test_reduce_and_normalize_scatters_by_root_index_then_normalizes():
    a = torch.tensor([1.0, 2.0, 3.0, 6.0])
    b = torch.tensor([3.0, 2.0, 1.0, 2.0])
    roots = [[0, 1, 2, 3], [3, 2, 1, 0]]  # b's scores belong to root channels 3, 2, 1, 0
    # mean of a and b-by-root: [(1+2)/2, (2+1)/2, (3+2)/2, (6+3)/2] = [1.5, 1.5, 2.5, 4.5]; mean 2.5
    mean_mean = tp.importance.GroupMagnitudeImportance(group_reduction="mean", normalizer="mean")
    torch.testing.assert_close(tp_compat.reduce_and_normalize(mean_mean, [a, b], roots),
                               torch.tensor([0.6, 0.6, 1.0, 1.8]))
    # the importance's own reduction and normaliser: max, then / max -> [3, 2, 3, 6] / 6
    max_max = tp.importance.GroupMagnitudeImportance(group_reduction="max", normalizer="max")
    torch.testing.assert_close(tp_compat.reduce_and_normalize(max_max, [a, b], [roots[0], roots[0]]),
                               torch.tensor([0.5, 1 / 3, 0.5, 1.0]))
    # an explicit normaliser overrides the importance's: sum of [1.5, 1.5, 2.5, 4.5] is 10
    torch.testing.assert_close(tp_compat.reduce_and_normalize(mean_mean, [a, b], roots, "sum"),
                               torch.tensor([0.15, 0.15, 0.25, 0.45]))


def test_mean_reduce_mean_normalize_is_the_mean_over_layers_over_its_mean():
    a = torch.tensor([1.0, 2.0, 3.0, 6.0])
    b = torch.tensor([3.0, 2.0, 1.0, 2.0])
    idx = [0, 1, 2, 3]
    got = tp_compat.mean_reduce_mean_normalize([a, b], [idx, idx])
    expected = (a + b) / 2 / ((a + b) / 2).mean()  # [2, 2, 2, 4] / 2.5
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, torch.tensor([0.8, 0.8, 0.8, 1.6]))
    assert got.mean().item() == pytest.approx(1.0)


def test_channel_groups_follow_the_conv_groups_and_the_heads():
    model = ConvNet()
    p = _conv_pruner(model)
    assert tp_compat.channel_groups(p, _out_group(p, model.conv1)) == 1  # conv1 -> bn1 -> conv2: nothing grouped
    # conv2's outputs feed the grouped conv3: they come in conv3.groups slices
    assert tp_compat.channel_groups(p, _out_group(p, model.conv2)) == model.conv3.groups == 4
    # conv3 -> depthwise -> fc: the grouped conv's outputs set it; the depthwise conv adds no grouping
    assert tp_compat.channel_groups(p, _out_group(p, model.conv3)) == 4
    assert tp_compat.channel_groups(p, _out_group(p, model.dw)) == 4

    t = TinyTransformer()
    pa = _attn_pruner(t)
    for proj in (t.attn.q_proj, t.attn.k_proj, t.attn.v_proj):
        assert tp_compat.channel_groups(pa, _out_group(pa, proj)) == t.attn.num_heads == 4
    assert tp_compat.channel_groups(pa, _out_group(pa, t.attn.o_proj)) == 1  # the residual stream


def test_attention_group_true_for_qkv_false_for_conv_and_residual_groups():
    t = TinyTransformer()
    pa = _attn_pruner(t)
    qkv = {t.attn.q_proj, t.attn.k_proj, t.attn.v_proj}
    for proj in qkv:
        is_attn, layers = tp_compat.attention_group(pa, _out_group(pa, proj))
        assert is_attn is True and len(layers) == 3 and set(layers) == qkv
    assert tp_compat.attention_group(pa, _out_group(pa, t.embed)) == (False, [])

    model = ConvNet()
    p = _conv_pruner(model)
    for conv in (model.conv1, model.conv2, model.conv3, model.dw):
        assert tp_compat.attention_group(p, _out_group(p, conv)) == (False, [])


def test_attention_group_on_hugging_face_vit():
    pytest.importorskip("transformers")
    from compress.metrics import logits_of
    from compress.structured import attention
    from compress.zoo import hf_vit

    torch.manual_seed(0)
    model = hf_vit(hidden_size=32, heads=4, depth=1, intermediate_size=64).eval()
    sites = [s for s in attention.find_attention(model) if s.kind == "qkv"]
    assert len(sites) == 1 and sites[0].heads == 4
    p = tp.pruner.BasePruner(model, torch.randn(1, 3, 16, 16), importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=0.25, ignored_layers=[model.classifier], output_transform=logits_of,
                             **attention.pruner_kwargs(sites, 0.0, True))
    is_attn, layers = tp_compat.attention_group(p, _out_group(p, sites[0].qkv[0]))
    assert is_attn and set(layers) == set(sites[0].qkv)
    assert tp_compat.channel_groups(p, _out_group(p, sites[0].qkv[0])) == 4
    mlp_in = next(m for n, m in model.named_modules() if n.endswith(("intermediate.dense", "mlp.fc1")))
    assert tp_compat.attention_group(p, _out_group(p, mlp_in)) == (False, [])
    assert tp_compat.initial_channels(p, mlp_in, True, -1) == 64


def test_initial_channels_are_the_widths_at_build_time_and_survive_pruning():
    model = ConvNet()
    p = _conv_pruner(model)
    tracked = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}
    for name, m in tracked.items():
        out_ch, in_ch = _widths(m)
        assert tp_compat.initial_channels(p, m, True, -1) == out_ch, name
        assert tp_compat.initial_channels(p, m, False, -1) == in_ch, name
    assert tp_compat.initial_channels(p, nn.Linear(3, 5), True, 7) == 7  # untracked: the default
    assert tp_compat.initial_channels(p, model.fc, False, -1) == 24

    p.step()
    assert model.conv1.out_channels < 8 and model.conv3.out_channels < 24, "the step pruned nothing"
    assert tp_compat.initial_channels(p, model.conv1, True, -1) == 8
    assert tp_compat.initial_channels(p, model.conv3, True, -1) == 24
    assert tp_compat.initial_channels(p, model.fc, False, -1) == 24
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_set_initial_channels_makes_a_new_pruner_measure_against_the_unpruned_widths():
    model = ConvNet()
    before = {n: _widths(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    _conv_pruner(model).step()
    pruned_width = model.conv2.out_channels
    assert pruned_width < 16

    resumed = _conv_pruner(model)  # a pruner built on the already-pruned model sees the current widths
    assert tp_compat.initial_channels(resumed, model.conv2, True, -1) == pruned_width
    for name, m in model.named_modules():
        if name in before:
            assert tp_compat.set_initial_channels(resumed, m, *before[name]) is True, name
    assert tp_compat.initial_channels(resumed, model.conv2, True, -1) == 16
    assert tp_compat.initial_channels(resumed, model.conv2, False, -1) == 8
    assert tp_compat.initial_channels(resumed, model.fc, False, -1) == 24

    stranger = nn.Conv2d(3, 4, 1)
    assert tp_compat.set_initial_channels(resumed, stranger, 4, 3) is False
    assert tp_compat.initial_channels(resumed, stranger, True, -1) == -1  # and nothing was recorded for it
