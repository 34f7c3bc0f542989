"""Dynamic sparse training (SET, RigL): per-tensor density is constant across drop/grow updates,
masks move, pruned weights stay exactly zero, grown weights start at zero, and RigL grows where the
dense gradient is largest."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from compress.train.config import OptimizerConfig, TrainLoopConfig
from compress.lottery import experiment as lottery
from compress.sparsity import masks
from compress.sparsity.dynamic import DynamicSparsity
from compress.train.loop import train
from compress.zoo import lenet_300_100
from compress.modules import tensor_owner


pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse_model():
    torch.manual_seed(0)
    m = lenet_300_100(num_classes=10, in_channels=1, image_size=8)
    names = lottery.prunable_tensors(m)
    masks.set_masks(m, masks.random_masks_like(lottery.magnitude_prune(m, masks.current_masks(m, names), 0.8), 1))
    return m, names


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_drop_grow_keeps_density_and_zeros(method):
    model, names = _sparse_model()
    start = masks.current_masks(model, names)
    x, y = torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,))
    batches = lottery.ShuffledBatches(TensorDataset(x, y), 32, 0)
    it = iter(lottery.ShuffledBatches(TensorDataset(x, y), 32, 1))
    dyn = DynamicSparsity(names, method, every=5, end_step=30, alpha=0.3, seed=0, grad_batch=lambda: next(it))
    cfg = TrainLoopConfig(epochs=0, max_steps=32, optimizer=OptimizerConfig(name="adam", lr=1e-3))
    train(model, batches, cfg, on_step=dyn)
    assert dyn.updates == 5  # steps 5..25; none at or after end_step
    end = masks.current_masks(model, names)
    for n in names:
        assert int(end[n].sum()) == int(start[n].sum())
        assert not torch.equal(end[n], start[n])
        w = getattr(*tensor_owner(model, n))
        assert bool((w[end[n] == 0] == 0).all())
    assert dyn.fraction(0) == pytest.approx(0.3) and dyn.fraction(30) == pytest.approx(0.0)


def test_rigl_grows_where_dense_gradient_is_largest():
    model, names = _sparse_model()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    before = masks.current_masks(model, names)
    dyn = DynamicSparsity(["fc.weight"], "rigl", every=1, end_step=10, alpha=0.2, grad_batch=lambda: (x, y))
    grads = dyn._dense_grads(model)["fc.weight"].abs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dyn(1, model, opt)
    after = model.fc.weight_mask
    grown = (after > 0) & (before["fc.weight"] == 0)
    inactive_not_grown = (after == 0) & (before["fc.weight"] == 0)
    assert grown.any()
    assert grads[grown].min() >= grads[inactive_not_grown].max()
    assert bool((model.fc.weight[grown] == 0).all())  # grown connections start at zero
    assert masks.density(model)["fc.weight"] == pytest.approx(float(before["fc.weight"].mean()))
