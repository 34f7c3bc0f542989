"""Models whose dependency graph Torch-Pruning 1.6 walks badly, in small pure-torch reproductions.

* Windowed attention (Swin style): the reshapes of the attention scores ``(B, heads, N, N)`` and of
  the relative-position bias table ``(N*N, heads)`` act on tokens and heads, not channels.
  Torch-Pruning on torch 2 gave them flatten index mappings that coupled heads to channels with a
  stride on a cycle, so enumerating the groups multiplied the indices at every pass (swin_t did not
  finish in minutes) and the groups held indices past their layers' widths. The adapter keeps those
  reshapes out of the channel mappings and still maps a real flatten (conv features -> Linear).
* Partial residuals (ReXNet style, ``cat([y[:, :c] + x, y[:, c:]])`` in every block): Torch-Pruning's
  walk re-propagates a layer for every new combination of indices reaching it, which grows
  combinatorially with depth (7 such blocks: about a minute for the groups; rexnet_100 never
  finished). The adapter's walk visits each (layer, index) once and gives the same groups.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from compress.metrics import logits_of
from compress.structured import pruner as pruning


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.num_heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # unwrapped parameter: Torch-Pruning prunes its last dim (the heads)
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten(), persistent=False)

    def forward(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        win, heads = self.window, self.num_heads
        # q/k/v and the output projection run on (B, H, W, C) tokens, the windows are cut in between
        qkv = self.qkv(x).view(b, h // win, win, w // win, win, 3 * c).permute(0, 1, 3, 2, 4, 5)
        qkv = qkv.reshape(-1, win * win, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bn, n = q.shape[0], q.shape[2]
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
        attn = attn + self.bias_table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        attn = attn.view(b, -1, heads, n, n)  # the shifted-window mask is added per window here
        attn = attn.view(-1, heads, n, n).softmax(-1)
        x = (attn @ v).transpose(1, 2).reshape(bn, n, c)
        x = x.view(b, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return self.proj(x)


class _TinySwin(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, window: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({"norm1": nn.LayerNorm(dim), "attn": _WindowAttention(dim, heads, window),
                                              "norm2": nn.LayerNorm(dim), "mlp": nn.Sequential(
                                                  nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))}))
        self.conv = nn.Conv2d(dim, 8, 1)
        self.head = nn.Linear(8 * 8 * 8, 10)  # a real channel flatten: (B, 8, 8, 8) -> (B, 512)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm1"](x))
            x = x + blk["mlp"](blk["norm2"](x))
        x = self.conv(x.permute(0, 3, 1, 2))
        return self.head(torch.flatten(x, 1))


def _flatten_mappings(DG) -> list[tuple[str, int]]:
    found = []
    for node in DG.module2node.values():
        for dep in node.dependencies:
            for mapping in dep.index_mapping:
                if isinstance(mapping, _FlattenIndexMapping):
                    found.append((node.name, mapping._stride))
    return found


def test_attention_score_reshapes_get_no_channel_mapping_and_groups_stay_within_widths():
    torch.manual_seed(0)
    model = _TinySwin().eval()
    x = torch.randn(1, 3, 32, 32)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    # only the conv -> Linear flatten is mapped (stride 8*8 = 64, both directions), nothing on the
    # attention scores or the bias table
    assert {stride for _, stride in _flatten_mappings(DG)} == {64}
    assert len(_flatten_mappings(DG)) == 2
    groups = list(DG.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    widest = max(max(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    for group in groups:
        for dep, idxs in group:
            # the old mappings multiplied the indices on every pass round the cycle; a group that
            # still cannot line up (q/k channels reaching the bias table through the scores) is
            # left whole by the pruner, but its indices stay bounded
            assert len(idxs) <= widest and max(idxs) < widest, (dep, len(idxs))
    residual = next(g for g in groups if any(dep.target.module is model.stem for dep, _ in g))
    members = {dep.target.module for dep, _ in residual}
    assert model.blocks[0]["attn"].qkv in members and model.blocks[1]["mlp"][2] in members
    head_in = [idxs for dep, idxs in DG.get_pruning_group(model.conv, tp.prune_conv_out_channels, [1])
               if dep.target.module is model.head]
    assert head_in == [list(range(64, 128))]  # channel 1 of the conv is inputs 64..127 of the Linear


def test_tiny_swin_prunes_half_and_attention_widths_stay_consistent():
    torch.manual_seed(0)
    model = _TinySwin().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = tuple(logits_of(model(x)).shape)
    before = sum(p.numel() for p in model.parameters())
    gp = pruning.GuardedPruner(model, x[:1], tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5,
                               scope="global", guards=pruning.Guards(round_to=None, min_channels=None))
    gp.step()
    pruning.check_model_runs(model, x, ref, gp.output_name)
    assert sum(p.numel() for p in model.parameters()) / before < 0.8
    for blk in model.blocks:
        attn = blk["attn"]
        width = attn.proj.out_features  # the residual width the block reads and writes
        assert attn.qkv.in_features == width and attn.qkv.out_features == 3 * width == 3 * attn.proj.in_features
        assert width % attn.num_heads == 0 and attn.bias_table.shape[1] == attn.num_heads
    assert model.head.in_features == 64 * model.conv.out_channels
    assert set(gp.timing) >= {"graph", "rank", "cut", "checks"}


class _PartialResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin = cin
        self.conv = nn.Conv2d(cin, cout, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.cat([y[:, :self.cin] + x, y[:, self.cin:]], 1)


class _PartialResiduals(nn.Module):
    def __init__(self, blocks: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[_PartialResidualBlock(8 + 4 * i, 12 + 4 * i) for i in range(blocks)])
        self.head = nn.Linear(8 + 4 * blocks, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _groups(DG, build) -> list[dict]:
    out = []
    for mod in DG.module2node:
        if isinstance(mod, nn.Conv2d):
            group = build(DG, mod, tp.prune_conv_out_channels, list(range(mod.out_channels)))
            out.append({(dep.target.name, dep.handler.__name__): sorted(idxs) for dep, idxs in group})
    return out


def test_partial_residual_groups_equal_torch_prunings_and_each_layer_is_visited_once():
    from compress.structured import tp_extensions

    torch.manual_seed(0)
    model = _PartialResiduals(blocks=4).eval()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    torch_prunings = tp.dependency.DependencyGraph.get_pruning_group.__wrapped__  # the unguarded original
    ours = _groups(DG, tp_extensions.propagate_group)
    assert ours == _groups(DG, torch_prunings)
    assert sum(len(g) for g in ours) > 4 * len(ours)  # the groups do span the blocks


def test_deep_partial_residual_net_is_analysed_and_left_running():
    torch.manual_seed(0)
    model = _PartialResiduals(blocks=12).eval()  # Torch-Pruning's own walk: far beyond minutes here
    x = torch.randn(2, 3, 8, 8)
    ref = tuple(model(x).shape)
    gp = pruning.GuardedPruner(model, x[:1], tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5,
                               scope="global", guards=pruning.Guards(round_to=None, min_channels=None))
    gp.step()
    pruning.check_model_runs(model, x, ref, gp.output_name)
    # one group spans every block; Torch-Pruning's slice/concat offsets do not line up in it, which
    # is reported (the same group Torch-Pruning builds, see the test above), not a hang or a traceback
    assert [s["group"] for s in gp.skipped] == ["blocks.11.conv"]
    assert "do not line up" in gp.skipped[0]["reason"]


class _FunctionalProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Linear(16, 16)  # applied with F.linear, as torchvision's Swin applies qkv/proj
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x))).mean((2, 3))
        return self.head(nn.functional.linear(x, self.proj.weight, self.proj.bias))


def _pruned_half(model: nn.Module, x: torch.Tensor, scope: str) -> pruning.GuardedPruner:
    gp = pruning.GuardedPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5, scope=scope,
                               guards=pruning.Guards(round_to=None, min_channels=None),
                               reference=pruning.channel_counts(model, x))
    gp.step()
    return gp


def test_layers_left_whole_are_reported_with_their_cause():
    # Torch-Pruning drops a group that cannot line up without a word, and never sees a layer forward
    # uses through F.linear: both must appear in the stage's unpruned groups, with the reason
    torch.manual_seed(0)
    model = _TinySwin().eval()
    gp = _pruned_half(model, torch.randn(1, 3, 32, 32), "global")
    whole = {e["group"]: e for e in gp.whole_layers()}
    # q/k/v output channels reach the bias table (heads) through the scores: refused, now reported
    for b in (0, 1):
        assert model.blocks[b]["attn"].qkv.out_features == 96
        reason = whole[f"blocks.{b}.attn.qkv"]["reason"]
        assert f"blocks.{b}.attn.bias_table (49, 4)" in reason and "refuses the group" in reason
    # the residual stream was tried and rolled back: reported by the step itself, not repeated
    assert any(s["group"].startswith("blocks.") for s in gp.skipped)
    assert not any(set(e.get("layers", [])) & {s["group"] for s in gp.skipped} for e in whole.values())
    assert "head" not in whole  # the classifier guard keeps it: already in gp.bound, not repeated

    model = _FunctionalProjection().eval()
    gp = _pruned_half(model, torch.randn(1, 3, 8, 8), "uniform")
    assert model.conv1.out_channels == 8
    whole = {e["group"]: e["reason"] for e in gp.whole_layers()}
    assert "outside the traced graph" in whole["proj"] and "conv1" not in whole
