"""Hugging Face models users bring, built from small configs (random init, nothing downloaded):
each pruned 50 % with the prune stage's defaults (global L2, guards), then forward, ONNX export and
ONNX Runtime parity. Token-id models (BERT) take integer ids all the way through."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

from compress.deploy.onnx_io import onnx_export, parity
from compress.example_inputs import example_input
from compress.metrics import count_params, logits_of
from compress.stages.prune import Config as PruneConfig
from compress.structured import pruner

tf = pytest.importorskip("transformers")
torch.set_num_threads(1)

IMG = dict(image_size=32, num_channels=3, num_labels=5)


def _vit():
    return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, patch_size=8, **IMG))


def _deit():
    return tf.DeiTForImageClassification(tf.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=128, patch_size=8, **IMG))


def _swin():
    return tf.SwinForImageClassification(tf.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                                                       patch_size=4, **IMG))


def _convnext():
    return tf.ConvNextForImageClassification(tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                               num_labels=5))


def _resnet():
    return tf.ResNetForImageClassification(tf.ResNetConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                           embedding_size=16, num_labels=5))


def _mobilevit():
    return tf.MobileViTForImageClassification(tf.MobileViTConfig(image_size=32, num_labels=5, hidden_sizes=[32, 48, 64],
                                                                 neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 80]))


def _segformer():
    return tf.SegformerForImageClassification(tf.SegformerConfig(num_labels=5, hidden_sizes=[16, 32, 64, 128],
                                                                 depths=[1, 1, 1, 1], decoder_hidden_size=64))


def _bert():
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=128, num_labels=5,
                                                          max_position_embeddings=32))


# name -> (builder, input shape, prune-stage fields other than the defaults)
CASES = {"vit": (_vit, (3, 32, 32), {}), "deit": (_deit, (3, 32, 32), {}), "swin": (_swin, (3, 32, 32), {}),
         "convnext": (_convnext, (3, 32, 32), {}), "resnet": (_resnet, (3, 32, 32), {}),
         "mobilevit": (_mobilevit, (3, 32, 32), {}), "segformer": (_segformer, (3, 32, 32), {}),
         "bert": (_bert, (12,), {})}


@pytest.mark.parametrize("name", list(CASES))
def test_hf_prune_half_forward_export_parity(name, tmp_path):
    build, shape, fields = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = example_input(model, shape, 1)
    ref = tuple(logits_of(model(x)).shape)
    before = count_params(model)
    cfg = PruneConfig(kind="prune", **fields)  # the stage's defaults: global L2, ratio 0.5, guards on
    gp = pruner.GuardedPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=cfg.ratio,
                              **cfg.pruner_kwargs())
    gp.step()
    pruner.check_model_runs(model, x, ref, gp.output_name)
    assert count_params(model) <= 0.8 * before, f"{name}: {count_params(model) / before:.2f} of params kept"
    # TorchScript first keeps the matrix fast; the exporter choice itself is tested in test_export_exporters
    path = onnx_export(model, shape, tmp_path / "m.onnx", exporter="torchscript").path
    res = parity(model, path, example_input(model, shape, 3, seed=1))
    assert res["parity_max_abs_error"] < 1e-4 and res["parity_top1_agreement"] == 100.0
