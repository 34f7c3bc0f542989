"""Data-aware pruning criteria on a segmentation task score with the task's loss: per-pixel
cross-entropy at the label size, ignored pixels left out. A model that predicts at 1/4 resolution
(as Segformer does) has no plain cross-entropy against full-size label maps; calibrating with one
raised a size mismatch in the prune stage (taylor, hessian, kfac and obs alike)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from compress.structured import criteria
from compress.tasks import Segmentation
from tests.conftest import REPO, cli
from tests.seg_models import segmenter


def _scenes(n: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 3, (n, size, size), generator=g)
    y[:, :2] = 255  # ignored rows
    return [(x, y)]


@pytest.mark.parametrize("name", ["taylor", "hessian", "kfac", "obs"])
def test_data_aware_criteria_calibrate_with_the_segmentation_loss(name):
    torch.manual_seed(0)
    model = segmenter(num_classes=3, width=4).eval()
    crit = criteria.IMPORTANCES.get(name)
    imp = crit.build()
    seg = Segmentation(ignore_index=255)
    with pytest.raises(RuntimeError, match="size mismatch|Expected target size"):
        criteria.calibrate(crit, imp, model, _scenes(), "cpu")  # the classification default cannot score it
    model.zero_grad(set_to_none=True)
    criteria.calibrate(crit, imp, model, _scenes(), "cpu", loss=seg.loss)
    if name == "taylor":  # the gradient left for scoring is the task loss's, ignored pixels excluded
        x, y = _scenes()[0]
        expected = torch.autograd.grad(seg.loss(model(x), y), model.head.weight)[0]
        torch.testing.assert_close(model.head.weight.grad, expected)


def _run_segmenter(tmp_path, name: str, train_size: int, stages: list[dict]) -> list[dict]:
    """Run a recipe on the quarter-resolution segmenter; the summary's stage entries."""
    recipe = {
        "name": name, "seed": 0, "device": "cpu", "task": {"name": "segmentation"},
        "model": {"factory": "tests.seg_models:segmenter", "kwargs": {"num_classes": 11, "width": 16},
                  "input_shape": [1, 64, 64]},
        "data": {"dataset": "digit_scenes", "train_size": train_size, "val_size": 16, "batch_size": 16},
        "stages": stages,
        "gates": {"max_metric_drop": None},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("run", str(path), "--out", str(tmp_path / "run"), "-q", cwd=REPO)
    assert res.returncode == 0, res.stderr
    return json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]


def test_taylor_prunes_a_quarter_resolution_segmenter_through_the_pipeline(tmp_path):
    stages = _run_segmenter(tmp_path, "seg-taylor", 64, [
        {"kind": "train", "epochs": 1, "optimizer": {"name": "adam", "lr": 0.01}},
        {"kind": "prune", "importance": "taylor", "ratio": 0.5, "ignore": ["head"], "calibration_batches": 2}])
    prune = stages[1]
    assert prune["importance"] == "taylor" and prune["params_after"] < prune["params_before"]
    assert 0 <= prune["miou_after_prune"] <= 100


def test_a_latency_target_on_a_segmenter_reports_the_task_metric(tmp_path):
    # the latency allocator's path reported ctx.evaluate()["accuracy"], a KeyError for a task scored by mIoU
    prune = _run_segmenter(tmp_path, "seg-latency", 32, [
        {"kind": "prune", "importance": "l2", "ignore": ["head"],
         "target": {"latency": 0.8, "tolerance": 0.5, "refits": 1, "batch_size": 1, "threads": 1}}])[0]
    assert prune["scope"] == "latency_allocator" and prune["params_after"] < prune["params_before"]
    assert 0 <= prune["miou_after_prune"] <= 100 and "accuracy_after_prune" not in prune
