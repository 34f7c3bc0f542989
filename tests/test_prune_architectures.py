"""Every architecture family the issue names, pruned 50 %, then forward, ONNX export and ONNX
Runtime parity; attention heads removed and patched; portable checkpoints of pruned transformers."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.structured import pruner as pruning
from compress.structured.attention import find_attention
from compress.metrics import count_macs, logits_of
from compress.model_io import load_portable, save_portable
from compress.deploy.onnx_io import export_onnx, parity
from compress.errors import InputError
from compress.zoo import MODELS

torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a shared 2-core box

HAS_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="transformers is not installed")

CASES = [
    ("resnet20", {"width": 16}, (3, 16, 16)),
    ("resnet_bottleneck_small", {}, (3, 16, 16)),
    ("mobilenet_v2", {"num_classes": 10, "width_mult": 0.5, "small_input": True}, (3, 16, 16)),
    ("densenet_small", {}, (3, 16, 16)),
    ("resnext_small", {}, (3, 16, 16)),
    ("senet_small", {}, (3, 16, 16)),
    ("convnext_small_blocks", {}, (3, 16, 16)),
    ("vit_tiny", {"image_size": 16, "dim": 64, "depth": 2, "heads": 4}, (3, 16, 16)),
    pytest.param("hf_vit", {}, (3, 16, 16), marks=needs_hf),
    pytest.param("hf_segformer", {}, (3, 32, 32), marks=needs_hf),
]


def _prune(model, shape, ratio=0.5, **kw):
    torch.manual_seed(0)
    x = torch.randn(1, *shape)
    ref = tuple(logits_of(model.eval()(x)).shape)
    gp = pruning.GuardedPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=ratio,
                               scope=kw.pop("scope", "uniform"), **kw)
    gp.step()
    pruning.check_model_runs(model, x, ref, gp.output_name)
    return gp


@pytest.mark.parametrize("name,kwargs,shape", CASES)
def test_prune_half_forward_export_parity(name, kwargs, shape, tmp_path):
    torch.manual_seed(0)
    model = MODELS.get(name)(**kwargs).eval()
    macs0 = count_macs(model, shape)
    _prune(model, shape)
    macs1 = count_macs(model, shape)
    assert macs1 < 0.6 * macs0, f"{name}: only {macs1 / macs0:.2f} of MACs removed"
    onnx_path = export_onnx(model, shape, tmp_path / "m.onnx")
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    res = parity(model, onnx_path, x)
    assert res["parity_max_abs_error"] < 1e-4
    assert res["parity_top1_agreement"] == 100.0


def test_segformer_logits_are_quarter_resolution():
    pytest.importorskip("transformers")
    model = MODELS.get("hf_segformer")(num_classes=5).eval()
    _prune(model, (3, 32, 32))
    out = logits_of(model(torch.randn(2, 3, 32, 32)))
    assert tuple(out.shape) == (2, 5, 8, 8)


@needs_hf
@pytest.mark.parametrize("head_dims", [False, True])
def test_hf_vit_heads_pruned_and_patched(head_dims, tmp_path):
    model = MODELS.get("hf_vit")(hidden_size=64, heads=4).eval()
    gp = _prune(model, (3, 16, 16), ratio=0.5 if head_dims else 0.0, heads_ratio=0.25, head_dims=head_dims)
    for layer in model.vit.layers:
        att = layer.attention
        assert att.num_attention_heads == 3
        assert att.q_proj.out_features == att.k_proj.out_features == 3 * att.head_dim
        assert att.head_dim == (16 if not head_dims else 8)
    assert model.config.num_attention_heads == 3
    assert all(s.heads == 3 for s in gp.sites)
    path = export_onnx(model, (3, 16, 16), tmp_path / "vit.onnx")
    assert parity(model, path, torch.randn(2, 3, 16, 16))["parity_max_abs_error"] < 1e-4


@needs_hf
def test_segformer_heads_pruned_per_stage():
    model = MODELS.get("hf_segformer")(heads=(2, 4)).eval()
    gp = _prune(model, (3, 32, 32), ratio=0.0, heads_ratio=0.5, head_dims=False)
    heads = sorted(s.heads for s in gp.sites)
    assert heads == [1, 2]  # half of 2 and of 4 heads removed, widths patched so forward runs
    for s in gp.sites:
        assert s.module.num_attention_heads * s.module.head_dim == s.qkv[0].out_features


def test_mha_drops_whole_heads_after_the_split_replacement():
    model = MODELS.get("vit_tiny")(image_size=16, dim=32, depth=1, heads=4).eval()
    gp = pruning.GuardedPruner(model, torch.randn(1, 3, 16, 16), tp.importance.GroupMagnitudeImportance(),
                               ratio=0.0, scope="uniform", heads_ratio=0.5, head_dims=False)
    gp.step()
    assert [c["module"] for c in gp.converted] == ["blocks.0.attn"] and model.blocks[0].attn.num_heads == 2
    model(torch.randn(2, 3, 16, 16))


def test_heads_without_any_attention_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="heads.ratio"):
        pruning.GuardedPruner(model, torch.randn(1, 3, 8, 8), tp.importance.GroupMagnitudeImportance(),
                              ratio=0.5, scope="uniform", heads_ratio=0.25)


def test_vit_tiny_head_dims_shrink_in_every_head():
    model = MODELS.get("vit_tiny")(image_size=16, dim=64, depth=1, heads=4).eval()
    _prune(model, (3, 16, 16))
    mha = model.blocks[0].attn
    assert mha.num_heads == 4 and mha.embed_dim == 32 and mha.head_dim == 8


@pytest.mark.parametrize("factory,kwargs,shape", [
    ("vit_tiny", {"image_size": 16, "dim": 64, "depth": 2, "heads": 4}, (3, 16, 16)),
    pytest.param("hf_vit", {"hidden_size": 64, "heads": 4}, (3, 16, 16), marks=needs_hf),
    pytest.param("hf_segformer", {}, (3, 32, 32), marks=needs_hf),
])
def test_portable_checkpoint_of_pruned_transformer(factory, kwargs, shape, tmp_path):
    model = MODELS.get(factory)(**kwargs).eval()
    _prune(model, shape, heads_ratio=0.5 if factory.startswith("hf") else 0.0)
    save_portable(model, tmp_path, factory, kwargs, list(shape))
    again = load_portable(tmp_path)
    fresh, pruned, loaded = (find_attention(m) for m in (MODELS.get(factory)(**kwargs), model, again))
    assert [(s.heads, s.head_dim) for s in loaded] == [(s.heads, s.head_dim) for s in pruned]
    assert sum(s.heads * s.head_dim for s in loaded) < sum(s.heads * s.head_dim for s in fresh)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(logits_of(model(x)), logits_of(again(x)))


@needs_hf
def test_inspect_annotation_marks_attention_groups():
    model = MODELS.get("hf_vit")(hidden_size=64, heads=4).eval()
    x = torch.randn(1, 3, 16, 16)
    groups = pruning.describe_groups(model, x, ["classifier"])
    groups = pruning.annotate_guards(groups, model, x, ratio=0.5, scope="uniform", guards=pruning.Guards())
    att = [g["attention"] for g in groups if "attention" in g]
    assert [a["heads"] for a in att] == [4, 4] and all(a["head_dim"] == 16 for a in att)
    assert model.vit.layers[0].attention.q_proj.out_features == 64  # annotation prunes a copy only


@needs_hf
@pytest.mark.parametrize("seed", [16, 19, 22])  # seeds where global head ranking cuts layers unevenly
def test_head_width_rounded_per_head(seed):
    torch.manual_seed(seed)
    model = MODELS.get("hf_vit")(hidden_size=64, heads=4).eval()
    gp = _prune(model, (3, 16, 16), ratio=0.3, scope="global", heads_ratio=0.25, max_ratio=0.9)
    assert all(s.head_dim % 8 == 0 for s in gp.sites), [(s.heads, s.head_dim) for s in gp.sites]
    assert sum(s.heads for s in gp.sites) == 6  # 25 % of all 8 heads, ranked globally
    assert any(b["guard"] == "round_to" and "attention" in b["group"] for b in gp.bound)
