"""Sharded evaluation's pieces: the shards cover every item once, and each task's meter merged
from per-shard statistics gives the metrics one meter gets over all items. (The 2-process gloo
run in test_train_engine_cli checks the whole path under torchrun.)"""
from __future__ import annotations

import torch

from compress.distributed import shard_indices
from compress.metrics import ClassificationMeter
from compress.tasks import Segmentation


def test_shards_cover_every_item_exactly_once():
    for n, world in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        shards = [list(shard_indices(n, r, world)) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))


def _merged(make_meter, outputs, targets, world):
    """A meter fed shard r = items r::world, one per rank, merged in rank order."""
    stats = []
    for r in range(world):
        m = make_meter()
        idx = list(shard_indices(len(targets), r, world))
        if idx:
            m.update(outputs[idx], targets[idx])
        stats.append(m.statistics())
    merged = make_meter()
    merged.merge(stats)
    return merged.result()


def test_classification_meter_merged_from_shards_equals_one_meter():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(37, 10, generator=g), torch.randint(0, 10, (37,), generator=g)
    whole = ClassificationMeter()
    whole.update(logits, labels)
    for world in (2, 3, 40):   # 40: some ranks get no item
        got = _merged(ClassificationMeter, logits, labels, world)
        assert got["accuracy"] == whole.result()["accuracy"] and got["top5"] == whole.result()["top5"]
        assert abs(got["loss"] - whole.result()["loss"]) < 1e-5  # float32 sums, another order


def test_segmentation_meter_merged_from_shards_equals_one_meter():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, 6, 6, generator=g)
    labels = torch.randint(0, 4, (5, 6, 6), generator=g)
    labels[0, :2] = 255  # ignored pixels
    task = Segmentation(255)
    whole = task.meter()
    whole.update(logits, labels)
    for world in (2, 7):
        got = _merged(task.meter, logits, labels, world)
        assert got["miou"] == whole.result()["miou"]
        assert got["pixel_accuracy"] == whole.result()["pixel_accuracy"]
        assert abs(got["loss"] - whole.result()["loss"]) < 1e-5  # float32 sums, another order
