"""Whole-head pruning of ``nn.MultiheadAttention``: the module is replaced by its split-projection
equivalent (same outputs), whole heads go, and the pruned model runs, exports, matches ONNX Runtime
and survives the portable checkpoint."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import api
from compress.deploy.onnx_io import onnx_export, parity
from compress.model_io import load_portable, save_portable
from compress.structured.attention import SplitMultiheadAttention, split_multihead_attention

torch.set_num_threads(1)


class _TinyTorchTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def tiny_transformer():
    torch.manual_seed(0)
    return _TinyTorchTransformer().eval()


def test_split_form_computes_what_torch_multihead_attention_computes():
    ref = tiny_transformer()
    m = tiny_transformer()
    assert [r["replaced"] for r in split_multihead_attention(m)] == [True, True]
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    mask = torch.zeros(7, 7, dtype=torch.bool).triu(1)
    a, b = ref.encoder.layers[0].self_attn, m.encoder.layers[0].self_attn
    h = torch.randn(3, 7, 32)
    with torch.no_grad():
        for got, want in zip(b(h, h, h, attn_mask=mask), a(h, h, h, attn_mask=mask)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_whole_heads_of_torch_attention_are_pruned_exported_and_reloaded(tmp_path):
    m = tiny_transformer()
    x = torch.randn(1, 7, 12)
    res = api.prune(m, x, ratio=0.25, heads={"ratio": 0.5, "head_dims": False}, guards={"round_to": None})
    assert [r["module"] for r in res.metrics["attention_replaced"]] == ["encoder.layers.0.self_attn",
                                                                      "encoder.layers.1.self_attn"]
    for layer in m.encoder.layers:
        a = layer.self_attn
        assert isinstance(a, SplitMultiheadAttention) and a.num_heads == 2
        assert a.q_proj.out_features == a.k_proj.out_features == a.v_proj.out_features == 2 * a.head_dim == 16
        assert a.out_proj.in_features == 16 and a.q_proj.in_features == a.out_proj.out_features == m.embed.out_features
    assert res.params_after < res.params_before
    xs = torch.randn(4, 7, 12)
    r = onnx_export(m, (7, 12), tmp_path / "m.onnx", exporter="torchscript")  # the model is under test, not the exporter
    assert parity(m, r.path, xs)["parity_max_abs_error"] < 1e-4
    save_portable(m, tmp_path / "ckpt", f"{__name__}:tiny_transformer", {}, [7, 12])
    back = load_portable(tmp_path / "ckpt", trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(back(xs), m(xs))


def test_unsupported_multihead_attention_is_left_with_the_reason():
    m = nn.Sequential()
    m.add_module("attn", nn.MultiheadAttention(16, 2, add_bias_kv=True))
    (entry,) = split_multihead_attention(m)
    assert not entry["replaced"] and "add_bias_kv" in entry["reason"] and isinstance(m.attn, nn.MultiheadAttention)


def test_torchvision_vit_loses_whole_heads(tmp_path):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    m = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                                 num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    api.prune(m, x, ratio=0.25, heads={"ratio": 0.5, "head_dims": False}, guards={"round_to": None})
    assert all(layer.self_attention.num_heads == 2 for layer in m.encoder.layers)
    r = onnx_export(m, (3, 32, 32), tmp_path / "m.onnx", exporter="torchscript")
    assert parity(m, r.path, torch.randn(3, 3, 32, 32))["parity_max_abs_error"] < 1e-4
