"""Every pruning criterion against a value computed by hand on a tiny Linear -> Linear network,
then every criterion through the real prune stage on a small CNN."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.api import final_checkpoint, load
from compress.structured import criteria, pruner as pruning
from compress.recipe import validate_data
from compress.pipeline.runner import run_recipe

from conftest import tiny_recipe

N_IN, N_HID, N_OUT = 3, 4, 2


class TwoLinear(nn.Module):
    """fc1 -> (BN) -> fc2, no nonlinearity, so gradients are short closed forms."""

    def __init__(self, bn: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc1 = nn.Linear(N_IN, N_HID, bias=False)
        self.bn = nn.BatchNorm1d(N_HID) if bn else nn.Identity()
        self.fc2 = nn.Linear(N_HID, N_OUT, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(N_HID, N_IN, generator=g))
            self.fc2.weight.copy_(torch.randn(N_OUT, N_HID, generator=g))
            if bn:
                self.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.1]))

    def forward(self, x):
        return self.fc2(self.bn(self.fc1(x)))


def batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(5, N_IN, generator=g), torch.randint(0, N_OUT, (5,), generator=g)) for _ in range(2)]


def score(name: str, model: nn.Module, **build) -> torch.Tensor:
    """The criterion's per-channel score for fc1's output channels (group: fc1 rows, fc2 columns)."""
    crit = criteria.IMPORTANCES.get(name)
    imp = crit.build(**build)
    criteria.calibrate(crit, imp, model, batches(), "cpu")
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(2, N_IN))
    group = DG.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=list(range(N_HID)))
    return imp(group)


def per_sample():
    """Hand-derived per-sample quantities: hidden h = W1 x, logits z = W2 h,
    dl/dz = softmax(z) - onehot(y), dl/dh = W2^T dl/dz."""
    m = TwoLinear()
    W1, W2 = m.fc1.weight.detach(), m.fc2.weight.detach()
    X = torch.cat([b[0] for b in batches()])
    Y = torch.cat([b[1] for b in batches()])
    H = X @ W1.T
    D = torch.softmax(H @ W2.T, 1) - torch.nn.functional.one_hot(Y, N_OUT).float()
    return W1, W2, X, H, D, D @ W2


def mean_normalised(s):
    return s / s.mean()


def test_l1_and_l2_are_group_norms():
    m = TwoLinear()
    W1, W2 = m.fc1.weight.detach(), m.fc2.weight.detach()
    l1 = (W1.abs().sum(1) + W2.abs().sum(0)) / 2
    l2 = (W1.pow(2).sum(1) + W2.pow(2).sum(0)) / 2
    torch.testing.assert_close(score("l1", m), mean_normalised(l1))
    torch.testing.assert_close(score("l2", m), mean_normalised(l2))


def test_bn_scale_is_abs_gamma():
    m = TwoLinear(bn=True)
    gamma = torch.tensor([0.5, 2.0, 1.0, 0.1])
    torch.testing.assert_close(score("bn_scale", m), gamma / gamma.mean())


def test_fpgm_is_distance_to_other_filters():
    m = TwoLinear()
    W1, W2 = m.fc1.weight.detach(), m.fc2.weight.detach()

    def dist_sum(rows):
        return torch.tensor([sum(float(((rows[i] - rows[j]) ** 2).sum().sqrt()) for j in range(len(rows)))
                             for i in range(len(rows))])

    expected = (dist_sum(W1) + dist_sum(W2.T)) / 2
    torch.testing.assert_close(score("fpgm", m), mean_normalised(expected))


def test_lamp_divides_by_the_larger_scores():
    m = TwoLinear()
    W1, W2 = m.fc1.weight.detach(), m.fc2.weight.detach()
    s = (W1.pow(2).sum(1) + W2.pow(2).sum(0)) / 2
    expected = torch.stack([s[c] / s[s >= s[c]].sum() for c in range(N_HID)])
    torch.testing.assert_close(score("lamp", m), expected)


def test_random_is_seeded_uniform():
    model = TwoLinear()  # its init draws from the global generator too
    torch.manual_seed(0)
    got = score("random", model)
    torch.manual_seed(0)
    torch.testing.assert_close(got, torch.rand(N_HID))


def test_taylor_is_abs_weight_times_gradient():
    W1, W2, X, H, D, DH = per_sample()
    # calibration sums the gradients of the two batch-mean losses (5 samples each)
    dW1 = sum(DH[i: i + 5].T @ X[i: i + 5] / 5 for i in (0, 5))
    dW2 = sum(D[i: i + 5].T @ H[i: i + 5] / 5 for i in (0, 5))
    expected = ((W1 * dW1).abs().sum(1) + (W2 * dW2).abs().sum(0)) / 2
    torch.testing.assert_close(score("taylor", TwoLinear()), mean_normalised(expected))


def test_hessian_is_obd_with_fisher_diagonal_over_all_samples():
    W1, W2, X, H, D, DH = per_sample()
    F1 = torch.stack([torch.outer(DH[n], X[n]) ** 2 for n in range(len(X))]).mean(0)
    F2 = torch.stack([torch.outer(D[n], H[n]) ** 2 for n in range(len(X))]).mean(0)
    expected = ((F1 * W1 ** 2).sum(1) + (F2 * W2 ** 2).sum(0)) / 2
    torch.testing.assert_close(score("hessian", TwoLinear()), mean_normalised(expected))


def test_kfac_is_obd_with_kronecker_factors():
    W1, W2, X, H, D, DH = per_sample()
    n = len(X)
    A1, S1 = X.T @ X / n, DH.T @ DH / n
    A2, S2 = H.T @ H / n, D.T @ D / n
    rows = torch.stack([0.5 * S1[c, c] * W1[c] @ A1 @ W1[c] for c in range(N_HID)])
    cols = torch.stack([0.5 * (W2[:, c] @ S2 @ W2[:, c]) * A2[c, c] for c in range(N_HID)])
    torch.testing.assert_close(score("kfac", TwoLinear()), mean_normalised((rows + cols) / 2))


def obs_fisher_inverse(damp=0.01):
    W1, W2, X, H, D, DH = per_sample()
    G = [torch.outer(D[n], H[n]) for n in range(len(X))]          # per-sample gradient of fc2.weight
    F = sum(g.T @ g for g in G) / (len(X) * N_OUT)                 # rows share one Fisher
    F = F + damp * F.diagonal().mean() * torch.eye(N_HID)
    return W2, torch.linalg.inv(F)


def test_obs_is_optimal_brain_surgeon_on_the_consumer():
    W2, Finv = obs_fisher_inverse()
    expected = torch.stack([0.5 * (W2[:, c] ** 2).sum() / Finv[c, c] for c in range(N_HID)])
    torch.testing.assert_close(score("obs", TwoLinear()), mean_normalised(expected), rtol=1e-4, atol=1e-5)


# tiny layers: let them halve (min_channels/round_to would keep them whole)
NO_SIZE_GUARDS = pruning.Guards(min_channels=None, round_to=None)


def test_obs_update_compensates_the_surviving_columns():
    W2, Finv = obs_fisher_inverse(damp=0.05)
    model = TwoLinear()
    crit = criteria.IMPORTANCES.get("obs")
    imp = crit.build(obs_update=True, obs_dampening=0.05)
    criteria.calibrate(crit, imp, model, batches(), "cpu")
    scores = score("obs", TwoLinear(), obs_dampening=0.05)
    pruned = sorted(scores.argsort()[:2].tolist())
    kept = [c for c in range(N_HID) if c not in pruned]
    pruning.GuardedPruner(model, torch.zeros(1, N_IN), imp, ratio=0.5, scope="uniform", ignore=["fc2"],
                          guards=NO_SIZE_GUARDS).step()
    S = torch.tensor(pruned)
    updated = W2 - W2[:, S] @ torch.linalg.inv(Finv[S][:, S]) @ Finv[S]
    assert model.fc2.weight.shape == (N_OUT, 2)
    torch.testing.assert_close(model.fc2.weight.detach(), updated[:, kept], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(updated[:, kept], W2[:, kept])  # the update really moved the survivors


CASES = [(name, {}) for name in sorted(criteria.IMPORTANCES.names())] + [("obs", {"obs_update": True})]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small_cnn trained once on digits (1 epoch); one thread, the CI box is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    r = tiny_recipe()
    r["model"]["kwargs"]["width"] = 8
    r["stages"] = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}}]
    run_dir = tmp_path_factory.mktemp("dense") / "run"
    run_recipe(validate_data(r), run_dir)
    r["model"]["checkpoint"] = str(final_checkpoint(run_dir) / "model.safetensors")
    yield r
    torch.set_num_threads(threads)


@pytest.mark.parametrize("importance,extra", CASES, ids=[c[0] + ("+update" if c[1] else "") for c in CASES])
def test_prune_stage_end_to_end(tmp_path, trained, importance, extra):
    r = {**trained, "stages": [
        {"kind": "prune", "importance": importance, "ratio": 0.5, "scope": "uniform", "round_to": None,
         "guards": {"min_channels": None},  # 8-channel layers: let them halve
         "calibration_batches": 2, **extra},
    ]}
    summary = run_recipe(validate_data(r), tmp_path / "run")
    model = load(tmp_path / "run")
    # stem 8 -> 4, conv1 + residual 16 -> 8, conv2 32 -> 16; the classifier keeps its 10 outputs
    assert model.stem[0].out_channels == 4
    assert model.conv1[0].out_channels == model.res_b[0].out_channels == 8
    assert model.conv2[0].out_channels == 16
    assert model.fc.out_features == 10 and model.fc.in_features == 16
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    prune = summary["stages"][0]
    assert prune["importance"] == importance and prune["params_after"] < prune["params_before"]
    assert 0.0 <= prune["accuracy_after_prune"] <= 100.0


def test_obs_update_returns_the_inverse_fisher_of_the_survivors():
    """After removing columns S, the next update (a consumer fed by several groups) needs (F_RR)^-1."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 6, generator=g)
    Fm = X.T @ X / 20 + 0.1 * torch.eye(6)
    weight = torch.randn(3, 3, 2, generator=g)          # a "conv1d-like" layer: 3 channels x 2 taps
    survivors_inverse = criteria.obs_update(weight, torch.linalg.inv(Fm).double(), [1], in_features=3)
    keep = [0, 1, 4, 5]
    torch.testing.assert_close(survivors_inverse, torch.linalg.inv(Fm[keep][:, keep]).double(), rtol=1e-5, atol=1e-6)
    assert torch.all(weight[:, 1] == 0)                 # the removed channel's columns are compensated to zero


def test_obs_update_with_another_criterion_is_refused(write_recipe):
    from compress.errors import InputError
    from compress.recipe import load_recipe

    r = tiny_recipe()
    r["stages"] = [{"kind": "prune", "importance": "l2", "obs_update": True}]
    with pytest.raises(InputError, match="obs_update needs importance: obs"):
        load_recipe(write_recipe(r))


class ConcatNet(nn.Module):
    """Two groups (a's and b's channels) feed one consumer through a concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a = self.a(x)
        return self.fc(self.c(torch.cat([a, self.b(a)], 1)).mean((2, 3)))


def test_obs_update_through_a_concat_consumer():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    crit = criteria.IMPORTANCES.get("obs")
    imp = crit.build(obs_update=True)
    pruner = pruning.GuardedPruner(model, x[:1], imp, ratio=0.5, scope="uniform", guards=NO_SIZE_GUARDS)
    criteria.calibrate(crit, imp, model, [(x, y)], "cpu")
    pruner.step()
    assert model.c.in_channels == 8 and model(x).shape == (16, 10)
    # both groups updated c; after each update the inverse Fisher was downdated to the surviving columns
    assert imp._inverse[model.c].shape == (8 * 9, 8 * 9)
