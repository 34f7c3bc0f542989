"""Which ONNX exporter writes the file: dynamo by default, TorchScript as the reported fallback
(and the other way round), the opset read back from the file, token-id inputs end to end, and
parity judged relative to the logit scale."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from compress.deploy.onnx_io import onnx_export, parity, written_opset
from compress.example_inputs import example_input, token_vocabulary
from compress.metrics import count_macs

torch.set_num_threads(1)


def _net(pool=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(pool),
                         nn.Flatten(), nn.Linear(8 * pool * pool, 4)).eval()


def test_auto_uses_dynamo_and_reports_the_opset_written(tmp_path):
    r = onnx_export(_net(), (3, 8, 8), tmp_path / "m.onnx", opset=17)
    assert r.exporter == "dynamo" and r.fallback is None and r.requested == "auto"
    assert r.opset == written_opset(r.path) >= 18  # asked 17: dynamo writes 18, and that is what is reported
    assert r.metrics() == {"exporter": "dynamo", "exporter_requested": "auto", "opset": r.opset}
    x = torch.randn(5, 3, 8, 8)  # a batch size the export never saw
    assert parity(_net(), r.path, x)["parity_max_abs_error"] < 1e-5


def test_adaptive_pool_that_does_not_divide_falls_back_to_dynamo(tmp_path):
    # TorchScript cannot export adaptive_avg_pool2d whose output size does not divide the input
    # (vgg/alexnet at inputs other than 224): asked for TorchScript, the file comes from dynamo
    model = _net(pool=3)
    r = onnx_export(model, (3, 16, 16), tmp_path / "m.onnx", exporter="torchscript")
    assert r.exporter == "dynamo" and r.requested == "torchscript"
    assert "torchscript exporter failed" in r.fallback and "adaptive_avg_pool2d" in r.fallback
    assert parity(model, r.path, torch.randn(3, 3, 16, 16))["parity_max_abs_error"] < 1e-5


class _DataDependent(nn.Module):
    """A Python branch on a tensor's value: torch.export refuses it, TorchScript traces one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > -1e9:  # always true: the traced branch is the only one
            return self.fc(x)
        return -self.fc(x)


def test_dynamo_failure_falls_back_to_torchscript(tmp_path):
    r = onnx_export(_DataDependent().eval(), (6,), tmp_path / "m.onnx")
    assert r.exporter == "torchscript" and r.opset == written_opset(r.path) == 17
    assert r.fallback.startswith("dynamo exporter failed") and r.fallback.endswith("used the torchscript exporter")


def test_parity_is_judged_relative_to_the_logit_scale(tmp_path):
    # logits near 1e6: one fp32 ulp is 0.06, so only the relative error can meet 1e-4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[2].weight.mul_(1e6)
    r = onnx_export(model, (16,), tmp_path / "m.onnx")
    p = parity(model, r.path, torch.randn(8, 16))
    assert p["parity_logit_scale"] > 1e5
    assert p["parity_max_rel_error"] == p["parity_max_abs_error"] / p["parity_logit_scale"] < 1e-5


def test_token_id_model_prunes_exports_and_matches(tmp_path):
    tf = pytest.importorskip("transformers")
    from compress.structured import pruner
    import torch_pruning as tp

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3, max_position_embeddings=64)
    model = tf.BertForSequenceClassification(cfg).eval()
    assert token_vocabulary(model) == 500
    x = example_input(model, (16,), 2)
    assert x.dtype == torch.long and int(x.max()) < 500
    assert count_macs(model, (16,)) > 0  # counted on token ids, not floats
    gp = pruner.GuardedPruner(model, x[:1], tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5, scope="global")
    gp.step()
    pruner.check_model_runs(model, x[:1], (1, 3), gp.output_name)
    # TorchScript first: the input dtype is what is tested here, and dynamo takes ~10x longer on BERT
    r = onnx_export(model, (16,), tmp_path / "bert.onnx", exporter="torchscript")
    assert r.exporter == "torchscript"
    inp = onnx.load(str(r.path)).graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(1))
    assert parity(model, r.path, ids)["parity_max_abs_error"] < 1e-4


def test_example_input_follows_a_leading_embedding():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 4, 2))
    x = example_input(model, (4,), 3)
    assert x.dtype == torch.long and x.shape == (3, 4) and int(x.max()) < 50
    assert example_input(_net(), (3, 8, 8), 2).dtype == torch.float32
