"""Tasks beyond classification, end to end through the CLI on tiny real data: segmentation on the
built-in digit_scenes (M2NIST-style), a custom task, and a BERT-style classifier with dict inputs."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from compress.data import DataConfig, build_data
from compress.tasks import Segmentation, SegmentationMeter
from compress.train.config import DistillConfig
from tests.conftest import REPO, cli


def _run(tmp_path, recipe: dict) -> tuple:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("run", str(path), "--out", str(tmp_path / "run"), "-q", cwd=REPO)
    return res, tmp_path / "run"


def test_digit_scenes_are_real_digits_with_pixel_labels():
    d = build_data(DataConfig(dataset="digit_scenes", train_size=16, val_size=8), None, 3)
    again = build_data(DataConfig(dataset="digit_scenes", train_size=16, val_size=8), None, 3)
    x, y = d.train[5]
    assert x.shape == (1, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
    assert torch.equal(y, again.train[5][1])  # deterministic from the seed
    labels = set(torch.cat([d.train[i][1].unique() for i in range(16)]).tolist())
    assert 0 in labels and len(labels) > 3 and max(labels) <= 10
    ink = y > 0
    assert float(x[0][ink].mean()) > float(x[0][~ink].mean())  # labelled pixels are the digits' ink


def test_segmentation_objective_resizes_and_scores():
    seg = Segmentation(ignore_index=255)
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[:, :4] = 1
    y[0, 0, 0] = 255
    perfect = torch.zeros(2, 2, 2, 2)  # quarter resolution: resized (bilinear) to 8x8
    perfect[:, 1, :1], perfect[:, 0, 1:] = 10.0, 10.0
    m = SegmentationMeter(255)
    m.update(perfect, y)
    r = m.result()
    assert r["miou"] == pytest.approx(100.0) and r["pixel_accuracy"] == pytest.approx(100.0)
    assert float(seg.distill_loss(perfect, perfect, y, DistillConfig(alpha=1.0, temperature=2.0))) == pytest.approx(0, abs=1e-6)
    assert float(seg.loss(perfect, y)) < 0.05  # bilinear blending at the class boundary only


def test_segmentation_run_prunes_distils_exports_and_gates_on_miou(tmp_path):
    recipe = {
        "name": "seg", "seed": 0, "device": "cpu", "task": {"name": "segmentation"},
        "model": {"factory": "tests.seg_models:segmenter", "kwargs": {"num_classes": 11, "width": 16},
                  "input_shape": [1, 64, 64]},
        "data": {"dataset": "digit_scenes", "train_size": 64, "val_size": 16, "batch_size": 16,
                 "augment": {"horizontal_flip": 0.5}},
        "stages": [{"kind": "train", "epochs": 2, "optimizer": {"name": "adam", "lr": 0.01}},
                   {"kind": "prune", "importance": "l2", "ratio": 0.5, "ignore": ["head"]},
                   {"kind": "finetune", "epochs": 1, "optimizer": {"name": "adam", "lr": 0.001},
                    "distill": {"alpha": 0.5, "temperature": 2.0}},
                   {"kind": "export", "parity_samples": 4}],
        "gates": {"max_metric_drop": 100.0, "max_parity_error": 1e-3},
    }
    res, run = _run(tmp_path, recipe)
    assert res.returncode == 0, res.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["task"] == {"name": "segmentation", "primary_metric": "miou"}
    assert 0 < s["final"]["miou"] <= 100 and "accuracy" not in s["final"]
    gate = next(r for r in s["gates"]["results"] if r["gate"] == "max_metric_drop")
    assert gate["value"] == pytest.approx(s["dense"]["miou"] - s["final"]["miou"])
    assert "miou_after_prune" in s["stages"][1] and s["stages"][2]["distilled"]
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert meta["compress.task"] == "segmentation"
    assert json.loads(meta["compress.preprocess"])["mean"] == [0.5]
    assert "mean IoU" in (run / "report.md").read_text() and json.loads((run / "preprocess.json").read_text())


def test_custom_task_callables(tmp_path):
    recipe = {
        "name": "custom", "seed": 0, "device": "cpu",
        "task": {"name": "custom", "loss": "tests.seg_models:l1_loss", "metric": "tests.seg_models:pixel_hits"},
        "model": {"factory": "tests.seg_models:segmenter", "kwargs": {"num_classes": 11, "width": 4},
                  "input_shape": [1, 64, 64]},
        "data": {"dataset": "digit_scenes", "train_size": 32, "val_size": 8, "batch_size": 16},
        "stages": [{"kind": "train", "epochs": 1, "optimizer": {"name": "adam", "lr": 0.01}}],
        "gates": {"max_accuracy_drop": 5.0},
    }
    res, run = _run(tmp_path, recipe)
    assert res.returncode == 0, res.stderr
    s = json.loads((run / "summary.json").read_text())
    assert 50 < s["final"]["metric"] <= 100 and s["stages"][0]["metric"] == s["final"]["metric"]
    assert any(r["gate"] == "max_accuracy_drop" and r["note"].startswith("dense - final metric")
               for r in s["gates"]["results"])


def test_dict_inputs_bert_classifier_trains_and_exports(tmp_path):
    pytest.importorskip("transformers")
    recipe = {
        "name": "bert", "seed": 0, "device": "cpu",
        "model": {"factory": "tests.seg_models:tiny_bert", "kwargs": {"num_classes": 2}},
        "data": {"dataset": "tests.seg_models:token_data", "batch_size": 16},
        # data-aware stages read the same dict batches: Taylor's gradients, SparseGPT's Hessians
        "stages": [{"kind": "train", "epochs": 1, "optimizer": {"name": "adamw", "lr": 0.001}},
                   {"kind": "prune", "importance": "taylor", "ratio": 0.5, "ignore": ["classifier"],
                    "calibration_batches": 2},
                   {"kind": "sparsify", "pattern": "2:4", "method": "sparsegpt", "calibration_batches": 2},
                   # int8 calibrates on the same dict batches; the token ids and mask stay int64
                   {"kind": "export", "parity_samples": 8, "onnx": {"int8": {"calibration_batches": 2}}}],
        "gates": {"max_accuracy_drop": None, "max_parity_error": 1e-3, "max_int8_accuracy_drop": 10.0},
    }
    res, run = _run(tmp_path, recipe)
    assert res.returncode == 0, res.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["export"]["parity_max_abs_error"] < 1e-3 and s["final"]["macs"] > 0
    q = s["export"]["int8_quantized_layers"]
    assert q["int8_layers"] == q["layers"] > 0
    assert s["export"]["int8_unquantized_inputs"] == {"input_ids": "int64", "attention_mask": "int64"}
    assert any(r["gate"] == "max_int8_accuracy_drop" and r["passed"] for r in s["gates"]["results"])
    prune, sparsify = s["stages"][1], s["stages"][2]
    assert prune["importance"] == "taylor" and prune["params_after"] < prune["params_before"]
    assert sparsify["method"] == "sparsegpt" and sparsify["sparsity_in_sparsified_layers"] == 0.5
    assert "bert.encoder.layer.0.intermediate.dense" in sparsify["layers_sparsified"]
    import onnx

    names = [i.name for i in onnx.load(str(run / "model.onnx")).graph.input]
    assert names == ["input_ids", "attention_mask"]


def test_labels_outside_the_model_fail_before_training(tmp_path):
    recipe = {
        "name": "narrow", "seed": 0, "device": "cpu", "task": "segmentation",
        "model": {"factory": "tests.seg_models:segmenter", "kwargs": {"num_classes": 5, "width": 4},
                  "input_shape": [1, 64, 64]},
        "data": {"dataset": "digit_scenes", "train_size": 16, "val_size": 8},
        "stages": [{"kind": "train", "epochs": 1}],
    }
    res, run = _run(tmp_path, recipe)
    assert res.returncode == 2 and not run.exists()
    assert "model.kwargs.num_classes" in res.stderr and "5 outputs" in res.stderr and "11 classes" in res.stderr
