"""Linear mode connectivity and instability: the interpolation curve, the barrier, θ_k capture,
and the ``compress analyze`` commands on a tiny digits MLP."""
from __future__ import annotations

import json

import pytest
import torch
from compress.data import make_loader
from torch.utils.data import TensorDataset

from compress.train.config import OptimizerConfig, TrainLoopConfig
from compress.lottery import connectivity, experiment as lottery
from compress.metrics import evaluate
from compress.zoo import lenet_300_100
from compress.sparsity import masks

from conftest import cli


pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :10].argmax(1))  # a learnable rule
    return x, y


def _mlp(seed):
    torch.manual_seed(seed)
    return lenet_300_100(num_classes=10, in_channels=1, image_size=8)


def test_curve_endpoints_are_the_two_models_and_barrier_definition():
    x, y = _data()
    a, b = _mlp(0), _mlp(1)
    names = lottery.prunable_tensors(b)
    masks.set_masks(b, lottery.magnitude_prune(b, masks.current_masks(b, names), 0.9))  # dense vs 90 % sparse
    curve = connectivity.interpolation_curve(a, b, TensorDataset(x, y), points=7)
    assert [c["alpha"] for c in curve] == pytest.approx([i / 6 for i in range(7)], abs=1e-6)
    assert curve[0]["error"] == pytest.approx(100 - evaluate(a, make_loader(TensorDataset(x, y), 256, shuffle=False))["accuracy"])
    assert curve[-1]["error"] == pytest.approx(100 - evaluate(b, make_loader(TensorDataset(x, y), 256, shuffle=False))["accuracy"])
    assert connectivity.barrier(curve) == pytest.approx(
        max(c["error"] for c in curve) - (curve[0]["error"] + curve[-1]["error"]) / 2)
    same = connectivity.interpolation_curve(a, a, TensorDataset(x, y), points=5)
    assert connectivity.barrier(same) == 0.0 and len({c["loss"] for c in same}) == 1


def test_two_copies_from_theta_k_differ_only_by_data_order():
    x, y = _data()
    net = _mlp(0)
    loop = TrainLoopConfig(epochs=0, max_steps=30, optimizer=OptimizerConfig(name="sgd", lr=0.05, schedule="cosine"))
    start = connectivity.state_at(net, 10, loop, lottery.ShuffledBatches(TensorDataset(x, y), 32, 0))
    assert start.step == 10 and start.optimizer["state"]  # momentum buffers at step 10
    assert not torch.equal(start.weights["fc.weight"], net.fc.weight.detach())  # net itself is untouched
    a, b = connectivity.train_two_copies(net, start, loop, TensorDataset(x, y), 32, seeds=(1, 2))
    a2, _ = connectivity.train_two_copies(net, start, loop, TensorDataset(x, y), 32, seeds=(1, 3))
    assert torch.equal(a.fc.weight, a2.fc.weight)          # same θ_k and data order: same network
    assert not torch.equal(a.fc.weight, b.fc.weight)       # different data order: different network
    with pytest.raises(ValueError):
        connectivity.state_at(net, 31, loop, lottery.ShuffledBatches(TensorDataset(x, y), 32, 0))


def test_cli_instability_and_interpolate(tmp_path, write_recipe):
    recipe = write_recipe({
        "name": "lmc", "seed": 0, "device": "cpu",
        "model": {"factory": "lenet_300_100", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8},
                  "input_shape": [1, 8, 8]},
        "data": {"dataset": "digits", "batch_size": 32},
        "stages": [{"kind": "lottery", "rounds": 1, "train": {"iterations": 30, "eval_every": 10,
                                                              "validation": 200, "batch_size": 32}}]})
    out = tmp_path / "inst"
    r = cli("--quiet", "analyze", "instability", str(recipe), "--rewind", "5", "--points", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "instability.json").read_text())
    assert res["rewind_iteration"] == 5 and res["iterations"] == 30 and len(res["curve"]) == 5
    assert res["barrier"] >= 0 and (out / "instability.png").stat().st_size > 5000
    r = cli("analyze", "instability", str(recipe), "--rewind", "30", "--out", str(out))
    assert r.returncode == 2 and "--rewind" in r.stderr and "Traceback" not in r.stderr
    r = cli("analyze", "interpolate", str(tmp_path / "nope"), str(tmp_path / "nope"), "--recipe", str(recipe))
    assert r.returncode == 2 and "Traceback" not in r.stderr

    # dense vs 90 % sparse, from two portable checkpoints
    from compress.model_io import save_portable

    dense, sparse = _mlp(0), _mlp(1)
    names = lottery.prunable_tensors(sparse)
    masks.set_masks(sparse, lottery.magnitude_prune(sparse, masks.current_masks(sparse, names), 0.9))
    kwargs = {"num_classes": 10, "in_channels": 1, "image_size": 8}
    save_portable(dense, tmp_path / "a", "lenet_300_100", kwargs, [1, 8, 8])
    save_portable(sparse, tmp_path / "b", "lenet_300_100", kwargs, [1, 8, 8])
    out = tmp_path / "interp"
    r = cli("--quiet", "analyze", "interpolate", str(tmp_path / "a"), str(tmp_path / "b"), "--recipe", str(recipe),
            "--points", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "interpolation.json").read_text())
    assert len(res["curve"]) == 4 and res["barrier"] == pytest.approx(connectivity.barrier(res["curve"]))
    assert (out / "interpolation.png").is_file()


def test_instability_from_a_lottery_run_starts_at_its_theta0_with_the_level_masks(tmp_path, monkeypatch):
    from compress.config import ModelConfig
    from compress.data import DataConfig
    from compress.errors import InputError
    from compress.lottery import instability as inst
    from compress.paths import lottery_dir
    from compress.stages.lottery import TrainBlock

    kwargs = {"num_classes": 10, "in_channels": 1, "image_size": 8}
    spec = ModelConfig(factory="lenet_300_100", kwargs=kwargs, input_shape=[1, 8, 8])
    net = _mlp(3)
    level_masks = lottery.magnitude_prune(net, masks.current_masks(net, lottery.prunable_tensors(net)), 0.9)
    work = lottery_dir(tmp_path / "run", 0)  # what a lottery stage at index 0 leaves behind
    lottery.save_tensors(lottery.init_path(work), lottery.weights_of(net))
    lottery.save_tensors(lottery.masks_path(work, 1), level_masks)
    seen = []
    curve_of = connectivity.interpolation_curve

    def spy(a, b, *args, **kw):
        seen.extend([a, b])
        return curve_of(a, b, *args, **kw)

    monkeypatch.setattr(inst.connectivity, "interpolation_curve", spy)
    train = TrainBlock(iterations=8, batch_size=32, validation=200)
    data = DataConfig(dataset="digits", batch_size=32)
    res = inst.instability(spec, data, train, 0, 0, tmp_path / "out", rewind=2, run_dir=tmp_path / "run",
                           level=1, points=3)
    assert res["level"] == 1 and res["iterations"] == 8 and len(res["curve"]) == 3
    assert json.loads((tmp_path / "out" / "instability.json").read_text()) == res
    for child in seen:  # both copies trained under the level's masks: pruned weights stay zero
        assert masks.has_masks(child)
        for name, m in level_masks.items():
            w = dict(child.named_parameters())[name]
            assert torch.all(w.detach()[m == 0] == 0)
    with pytest.raises(InputError, match="masks-02.pt"):
        inst.instability(spec, data, train, 0, 0, tmp_path / "out", run_dir=tmp_path / "run", level=2)
