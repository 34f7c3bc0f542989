"""2:4 masks along the reduction dim (the layout TensorRT reads), layer eligibility, SparseGPT vs
magnitude on real inputs, and masks that survive fine-tuning with momentum / Adam state."""
from __future__ import annotations

import itertools

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from compress.train.config import TrainLoopConfig
from compress.sparsity import masks
from compress.sparsity.sparsegpt import prune_matrix, sparsegpt_masks
from compress.train.loop import train
from torch.utils.data import TensorDataset

from compress.data import make_loader
from compress.stages.sparsify import eligible_layers
from compress.sparsity import n_m


def _digits(n: int = 512) -> torch.Tensor:
    x = torch.tensor(load_digits().data[:n], dtype=torch.float32) / 16.0
    return x


def _groups_ok_conv(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Literal reading of the spec: for each output channel k and spatial (r, s), every m
    consecutive input channels hold >= n zeros."""
    k_, c_, r_, s_ = w.shape
    for k, r, s in itertools.product(range(k_), range(r_), range(s_)):
        for c0 in range(0, c_, m):
            if int((w[k, c0:c0 + m, r, s] == 0).sum()) < n:
                return False
    return True


def test_conv_mask_groups_input_channels_per_position():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    mask = n_m.n_m_mask(w)
    assert mask.shape == w.shape
    sparse = w * mask
    assert _groups_ok_conv(sparse)
    assert n_m.is_n_m_sparse(sparse, axis=1)
    # exactly half kept, and the kept ones are the two largest |w| of each group
    assert float(mask.mean()) == 0.5
    grp = w[2, 4:8, 1, 2].abs()
    assert set(torch.nonzero(mask[2, 4:8, 1, 2]).flatten().tolist()) == set(grp.topk(2).indices.tolist())
    # along another axis the pattern generally does not hold: the mask is not along the wrong dim
    assert not n_m.is_n_m_sparse(sparse, axis=0)


def test_linear_mask_along_in_features():
    torch.manual_seed(1)
    w = torch.randn(8, 16)
    sparse = w * n_m.n_m_mask(w)
    assert all(int((sparse[o, i:i + 4] == 0).sum()) >= 2 for o in range(8) for i in range(0, 16, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        n_m.n_m_mask(torch.randn(4, 6))


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)             # 3 input channels: skipped
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)   # depthwise: skipped
        self.grouped = nn.Conv2d(16, 16, 1, groups=2)          # 8 per group: eligible
        self.grouped_narrow = nn.Conv2d(16, 16, 1, groups=8)   # 2 per group: skipped
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc_odd = nn.Linear(24, 12)                         # ASP rule: out 12 % 8 != 0
        self.fc = nn.Linear(24, 10)


def test_eligible_layers_and_reasons():
    take, skipped = eligible_layers(_Zoo(), 4, ignore=None, asp_rule=False)
    names = [n for n, _ in take]
    assert names == ["grouped", "pw", "fc_odd", "fc"]
    reasons = {s["layer"]: s["reason"] for s in skipped}
    assert "not a multiple of 4" in reasons["stem"]
    assert reasons["dw"] == "depthwise conv"
    assert "input channels 2" in reasons["grouped_narrow"]

    take, skipped = eligible_layers(_Zoo(), 4, ignore=["fc"], asp_rule=True)
    names = [n for n, _ in take]
    assert names == ["pw"]
    reasons = {s["layer"]: s["reason"] for s in skipped}
    assert reasons["fc"] == "ignored by recipe"
    assert "ASP rule" in reasons["grouped"] and "ASP rule" in reasons["fc_odd"]  # in 8 % 16; out 12 % 8
    # grouped conv with 2:4 on its per-group input channels
    g = _Zoo().grouped
    masks.set_mask(g, n_m.n_m_mask(g.weight))
    assert n_m.is_n_m_sparse(g.weight, axis=1)


def _rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).pow(2).sum() / ref.pow(2).sum())


def test_sparsegpt_beats_magnitude_on_linear_with_real_inputs():
    torch.manual_seed(0)
    x = _digits()  # 64 strongly correlated pixel features
    layer = nn.Linear(64, 32)
    ref = layer(x).detach()
    mag = nn.Linear(64, 32)
    mag.load_state_dict(layer.state_dict())
    masks.set_mask(mag, n_m.n_m_mask(mag.weight))
    sgpt = nn.Linear(64, 32)
    sgpt.load_state_dict(layer.state_dict())
    wrapper = nn.Sequential(sgpt)
    found = sparsegpt_masks(wrapper, {"0": sgpt}, [x[i:i + 128] for i in range(0, 512, 128)], block=32)
    masks.set_mask(sgpt, found["0"])
    assert n_m.is_n_m_sparse(sgpt.weight, axis=1)
    assert float(found["0"].mean()) == 0.5
    e_mag, e_sgpt = _rel_err(ref, mag(x).detach()), _rel_err(ref, sgpt(x).detach())
    assert e_sgpt < 0.7 * e_mag, (e_sgpt, e_mag)


def test_sparsegpt_beats_magnitude_on_conv_im2col_order():
    torch.manual_seed(0)
    imgs = _digits(256).reshape(-1, 1, 8, 8)
    feats = torch.relu(nn.Conv2d(1, 8, 3, padding=1)(imgs)).detach()  # real images -> correlated channels
    conv = nn.Conv2d(8, 12, 3, padding=1)
    ref = conv(feats).detach()
    mag = nn.Conv2d(8, 12, 3, padding=1)
    mag.load_state_dict(conv.state_dict())
    masks.set_mask(mag, n_m.n_m_mask(mag.weight))
    sg = nn.Conv2d(8, 12, 3, padding=1)
    sg.load_state_dict(conv.state_dict())
    found = sparsegpt_masks(nn.Sequential(sg), {"0": sg}, [feats[:128], feats[128:]], block=16)
    masks.set_mask(sg, found["0"])
    assert _groups_ok_conv(sg.weight.detach()) and _groups_ok_conv(found["0"])
    assert _rel_err(ref, sg(feats).detach()) < 0.8 * _rel_err(ref, mag(feats).detach())


def test_prune_matrix_identity_hessian_equals_magnitude():
    """With uncorrelated inputs (H = I) OBS saliency is |w| and there is nothing to compensate."""
    torch.manual_seed(3)
    w = torch.randn(5, 16)
    pw, pm = prune_matrix(w, torch.eye(16), 2, 4, block=8, damp=1e-9)
    assert torch.equal(pm, n_m.n_m_mask(w))
    torch.testing.assert_close(pw, w * pm)


@pytest.mark.parametrize("opt", [{"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
                                 {"name": "adam", "lr": 0.01}])
def test_masks_persist_through_training(opt):
    torch.manual_seed(0)
    x = _digits(256)
    y = torch.tensor(load_digits().target[:256])
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    for mod in (model[0], model[2]):
        masks.set_mask(mod, n_m.n_m_mask(mod.weight))
    zero_before = {i: (model[i].weight == 0).clone() for i in (0, 2)}
    kept_before = {i: model[i].weight.detach().clone() for i in (0, 2)}
    cfg = TrainLoopConfig(epochs=2, max_steps=12, optimizer=opt)
    res = train(model, make_loader(TensorDataset(x, y), 32, shuffle=True, seed=0), cfg)
    assert res.steps == 12
    for i in (0, 2):
        w = model[i].weight.detach()
        z = zero_before[i]
        assert torch.equal(w == 0, z), "zero positions changed"
        assert n_m.is_n_m_sparse(w, axis=1)
        assert (w[~z] != kept_before[i][~z]).float().mean() > 0.5, "unmasked weights did not train"  # a few digits pixels are always 0


def test_mask_optimizer_state_zeroes_momentum():
    lin = nn.Linear(8, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(3, 8)).sum().backward()
    opt.step()  # dense momentum buffer everywhere
    masks.set_mask(lin, n_m.n_m_mask(lin.weight))
    masks.mask_optimizer_state(opt, lin)
    buf = opt.state[lin.weight]["momentum_buffer"]
    assert torch.all(buf[lin.weight_mask == 0] == 0)
