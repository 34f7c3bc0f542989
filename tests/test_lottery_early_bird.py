"""Early-Bird ticket detection from BatchNorm γ: the mask, the distance rule, and stopping early."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset
from torch import nn

from compress.train.config import OptimizerConfig, TrainLoopConfig
from compress.structured.early_bird import EarlyBird, channel_mask, split_mask, train_until_early_bird
from compress.lottery.experiment import ShuffledBatches

pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_channel_mask_is_a_global_gamma_ranking():
    net = _net()
    with torch.no_grad():
        net[1].weight.copy_(torch.arange(8, dtype=torch.float) + 100)  # layer 1 outranks every channel of layer 2
        net[4].weight.copy_(torch.linspace(-1, 1, 16))
    mask = channel_mask(net, ratio=0.5)
    assert int(mask.sum()) == 12
    per_layer = split_mask(net, mask)
    assert per_layer["1"].tolist() == [1.0] * 8
    assert int(per_layer["4"].sum()) == 4 and per_layer["4"][0] == 1 and per_layer["4"][-1] == 1  # |γ| largest


def test_ticket_emerges_when_masks_stop_changing():
    net = _net()
    eb = EarlyBird(ratio=0.5, window=3, threshold=0.1)
    assert not eb.update(net) and not eb.update(net)  # window not yet full
    assert eb.update(net) and eb.found_at == 3 and eb.distances[-1] == 0.0
    changing = EarlyBird(ratio=0.5, window=2, threshold=0.1)
    changing.update(net)
    with torch.no_grad():
        net[4].weight.mul_(-1).add_(torch.randn(16) * 10)
    assert not changing.update(net) and changing.distances[-1] >= 0.1


def test_training_stops_at_the_early_bird_epoch():
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    cfg = TrainLoopConfig(epochs=30, optimizer=OptimizerConfig(name="sgd", lr=1e-4))  # γ barely move
    eb = train_until_early_bird(_net(), ShuffledBatches(TensorDataset(x, y), 32, 0), cfg, EarlyBird(ratio=0.5, window=3))
    assert eb.found_at == 3 and len(eb.distances) == 3
    with pytest.raises(ValueError):
        channel_mask(nn.Linear(2, 2), 0.5)
