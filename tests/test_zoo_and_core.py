"""Model zoo shapes, mask core, portable checkpoints, inspect."""
from __future__ import annotations

import json

import pytest
import torch

from compress import zoo
from compress.sparsity import masks
from compress.model_io import load_portable, save_portable
from compress.sparsity import n_m

from conftest import cli, tiny_recipe

ZOO_CASES = {
    "small_cnn": ({}, (1, 8, 8)),
    "lenet_300_100": ({}, (1, 28, 28)),
    "conv2": ({}, (3, 32, 32)),
    "conv4": ({}, (3, 32, 32)),
    "conv6": ({}, (3, 32, 32)),
    "resnet20": ({}, (3, 32, 32)),
    "resnet32": ({}, (3, 32, 32)),
    "resnet56": ({}, (3, 32, 32)),
    "vgg11": ({"width_mult": 0.25}, (3, 32, 32)),
    "vgg16": ({"width_mult": 0.25}, (3, 32, 32)),
    "vgg19": ({"width_mult": 0.25}, (3, 32, 32)),
    "mobilenet_v2": ({"width_mult": 0.35, "num_classes": 10}, (3, 64, 48)),
    "vit_tiny": ({"depth": 2}, (3, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_zoo_forward(name):
    kwargs, shape = ZOO_CASES[name]
    m = zoo.MODELS.get(name)(**kwargs).eval()
    with torch.no_grad():
        out = m(torch.randn(2, *shape))
    assert out.shape == (2, kwargs.get("num_classes", 10))


def test_zoo_reference_sizes():
    """Parameter counts of the reference architectures (He et al.; Frankle & Carbin)."""
    assert sum(p.numel() for p in zoo.lenet_300_100().parameters()) == 266_610
    assert abs(sum(p.numel() for p in zoo.resnet20().parameters()) - 0.27e6) < 0.01e6
    assert abs(sum(p.numel() for p in zoo.MODELS.get("resnet50")().parameters()) - 25.56e6) < 0.01e6


def test_in_channels_respected():
    m = zoo.resnet20(in_channels=1, num_classes=7)
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 7)


def test_n_m_mask_conv_layout():
    """Conv [K, C, R, S]: for every output channel and spatial position, each run of 4 consecutive
    input channels keeps its 2 largest |w| (hand-checked on one position)."""
    torch.manual_seed(0)
    w = torch.randn(3, 8, 2, 2)
    m = n_m.n_m_mask(w, 2, 4)
    assert m.shape == w.shape
    groups = m.permute(0, 2, 3, 1).reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    col = w[1, 4:8, 0, 1].abs()
    expect = torch.zeros(4)
    expect[col.topk(2).indices] = 1
    assert torch.equal(m[1, 4:8, 0, 1], expect)
    assert n_m.is_n_m_sparse(w * m, axis=1)
    assert not n_m.is_n_m_sparse(w, axis=1)


def test_n_m_mask_linear_and_bad_width():
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5, 2.0, 2.5, -0.1, 9.0]])
    assert n_m.n_m_mask(w).tolist() == [[0, 1, 1, 0, 0, 1, 0, 1]]
    with pytest.raises(ValueError):
        n_m.n_m_mask(torch.randn(2, 6))


def test_masked_training_keeps_zeros_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    masks.set_mask(lin, n_m.n_m_mask(lin.weight))
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9)
    zeros = lin.weight == 0
    for _ in range(5):
        opt.zero_grad()
        lin(torch.randn(16, 8)).pow(2).sum().backward()
        masks.mask_gradients(lin)
        opt.step()
        masks.apply_masks(lin)
    assert (lin.weight[zeros] == 0).all() and (lin.weight[~zeros] != 0).all()


def test_portable_checkpoint_round_trip_pruned_and_masked(tmp_path):
    import torch_pruning as tp

    from compress.structured.pruner import build_pruner

    torch.manual_seed(0)
    m = zoo.small_cnn(width=16).eval()
    x = torch.randn(2, 1, 8, 8)
    build_pruner(m, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=0.5, scope="uniform").step()
    masks.set_mask(m.conv2[0], n_m.n_m_mask(m.conv2[0].weight))
    save_portable(m, tmp_path, "small_cnn", {"width": 16}, [1, 8, 8])
    arch = json.loads((tmp_path / "arch.json").read_text())
    assert arch["factory"] == "compress.zoo:small_cnn"
    back = load_portable(tmp_path)
    assert torch.allclose(back(x), m(x))
    assert back.conv2[0].out_channels == m.conv2[0].out_channels < 64
    assert "weight_mask" in dict(back.conv2[0].named_buffers())


def test_inspect_lists_coupled_groups(write_recipe):
    res = cli("inspect", str(write_recipe(tiny_recipe())), "--format", "json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["params"] > 0 and info["macs"] > 0
    # the residual block couples conv1's output, res_b's output and the convs reading them
    residual = [g for g in info["groups"] if "res_b.0.out" in g["members"]]
    assert residual and {"conv1.0.out", "res_a.0.in", "conv2.0.in"} <= set(residual[0]["members"])
    text = cli("inspect", str(write_recipe(tiny_recipe())))
    assert text.returncode == 0 and "group 0:" in text.stdout
