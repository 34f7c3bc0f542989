"""Guards (first conv, classifier, min_channels, round_to) and the refusal of broken models."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.structured import pruner as pruning
from compress.metrics import logits_of
from compress.errors import ModelBreakError
from compress.zoo import MODELS

from conftest import cli, tiny_recipe

torch.set_num_threads(1)


@pytest.fixture
def one_thread(monkeypatch):
    """CLI subprocesses on tiny models: thread start-up dominates on a shared 2-core box."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

OFF = pruning.Guards(first_conv_max_ratio=None, classifier=True, min_channels=None, round_to=None)


def _prune(model, shape, guards, ratio, scope="uniform", **kw):
    torch.manual_seed(0)
    x = torch.randn(1, *shape)
    ref = tuple(logits_of(model.eval()(x)).shape)
    gp = pruning.GuardedPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2), ratio=ratio, scope=scope,
                               guards=guards, **kw)
    gp.step()
    pruning.check_model_runs(model, x, ref, gp.output_name)
    return gp


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_first_conv_loses_at_most_half():
    m = MODELS.get("senet_small")()
    gp = _prune(m, (3, 16, 16), pruning.Guards(), 0.8)
    assert m.stem[0].out_channels == 16  # 32 -> at most 50 % removed
    hit = [b for b in gp.bound if b["guard"] == "first_conv_max_ratio"]
    assert hit and hit[0]["group"] == "stem.0" and hit[0]["kept"] == 16

    off = MODELS.get("senet_small")()
    _prune(off, (3, 16, 16), OFF, 0.8)
    assert off.stem[0].out_channels < 16


def test_min_channels_auto_and_explicit():
    m = MODELS.get("resnet20")(width=16)
    gp = _prune(m, (3, 16, 16), pruning.Guards(first_conv_max_ratio=None, round_to=None), 0.9)
    assert min(c.out_channels for c in _convs(m).values()) >= 8  # auto: max(8, original/16)
    assert any(b["guard"] == "min_channels" for b in gp.bound)

    m = MODELS.get("resnet20")(width=16)
    _prune(m, (3, 16, 16), pruning.Guards(first_conv_max_ratio=None, round_to=None, min_channels=12), 0.9)
    assert min(c.out_channels for c in _convs(m).values()) == 12

    m = MODELS.get("resnet20")(width=16)
    _prune(m, (3, 16, 16), OFF, 0.9)
    assert min(c.out_channels for c in _convs(m).values()) < 8  # the 16-1-16 bottleneck the guard prevents


def test_round_to_keeps_multiples():
    m = MODELS.get("resnet20")(width=16)
    gp = _prune(m, (3, 16, 16), pruning.Guards(), 0.3)
    assert all(c.out_channels % 8 == 0 for c in _convs(m).values())
    assert any(b["guard"] == "round_to" for b in gp.bound)

    m = MODELS.get("resnet20")(width=16)
    _prune(m, (3, 16, 16), OFF, 0.3)
    assert any(c.out_channels % 8 for c in _convs(m).values())


def test_grouped_conv_stays_divisible_by_groups():
    m = MODELS.get("resnext_small")()
    _prune(m, (3, 16, 16), pruning.Guards(), 0.5)
    for c in _convs(m).values():
        if c.groups > 1:
            assert c.out_channels % c.groups == 0 and c.in_channels % c.groups == 0
            assert c.out_channels % 8 == 0


def test_classifier_guard_and_refusal_when_off():
    m = MODELS.get("small_cnn")(num_classes=10, in_channels=1, width=16)
    gp = _prune(m, (1, 8, 8), pruning.Guards(), 0.5)
    assert m.fc.out_features == 10 and gp.bound[0] == {"guard": "classifier", "group": "fc", "detail": "outputs kept"}

    m = MODELS.get("small_cnn")(num_classes=10, in_channels=1, width=16)
    with pytest.raises(ModelBreakError, match=r"output shape changed \(1, 10\) -> \(1, \d\).*'fc'"):
        _prune(m, (1, 8, 8), pruning.Guards(classifier=False), 0.5)


class _HardcodedFlatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 32 * 4 * 4)  # a width baked into the code, as users write it


class _Brittle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.flatten = _HardcodedFlatten()
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.conv(x))))


def test_group_that_would_break_the_model_is_left_alone_and_reported():
    # a width baked into forward as a literal (no attribute to patch): the group is rolled back,
    # the model still runs, and the stage metrics say which group and why
    m = _Brittle()
    gp = _prune(m, (3, 8, 8), pruning.Guards(first_conv_max_ratio=None), 0.5)
    assert m.conv.out_channels == 32 and m.fc.in_features == 512
    assert len(gp.skipped) == 1 and gp.skipped[0]["group"] == "conv"
    assert re.search(r"module 'flatten': RuntimeError: shape '\[1, 512\]'", gp.skipped[0]["reason"])


def test_cli_refuses_output_shape_change_exit_2(write_recipe, tmp_path, one_thread):
    r = tiny_recipe()
    r["stages"] = [{"kind": "train", "epochs": 1},
                   {"kind": "prune", "ratio": 0.5, "guards": {"classifier": False}}]
    res = cli("-q", "run", str(write_recipe(r)), "--out", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    assert "output shape changed (1, 10)" in res.stderr and "'fc'" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_guard_value_names_field(write_recipe):
    from compress.errors import InputError
    from compress.recipe import load_recipe

    r = tiny_recipe()
    r["stages"] = [{"kind": "prune", "guards": {"min_channels": 0}}]
    with pytest.raises(InputError, match=r"stages\[0\]\.guards\.min_channels"):
        load_recipe(write_recipe(r))
    r["stages"] = [{"kind": "prune", "guards": {"first_conv": 0.5}}]  # a typo is an error, not ignored
    with pytest.raises(InputError, match="first_conv"):
        load_recipe(write_recipe(r))
    r["stages"] = [{"kind": "prune", "guards": {"min_channels": None, "round_to": None, "first_conv_max_ratio": None}}]
    assert load_recipe(write_recipe(r)).stages[0].resolved_guards() == OFF


def test_inspect_lists_groups_with_binding_guards(write_recipe, one_thread):
    r = tiny_recipe()
    r["stages"] = [{"kind": "prune", "ratio": 0.5, "scope": "uniform"}]
    path = write_recipe(r)
    res = cli("inspect", str(path), "--format", "json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["guards"]["round_to"] == 8 and info["groups"]
    flat = [g for grp in info["groups"] for g in grp["guards"]]
    assert any(g.startswith("classifier fc") for g in flat)
    assert all({"root", "channels", "members", "guards"} <= set(grp) for grp in info["groups"])
    text = cli("inspect", str(path))
    assert text.returncode == 0 and "group 0:" in text.stdout and "[guard: classifier fc" in text.stdout


def test_guards_hold_against_the_unpruned_model_across_pruners():
    m = MODELS.get("senet_small")()
    x = torch.randn(1, 3, 16, 16)
    ref = pruning.channel_counts(m, x)
    assert ref["stem.0"] == (32, 3)
    for _ in range(2):  # two separate pruner instances, as the stage builds for an iterative target
        _prune(m, (3, 16, 16), pruning.Guards(), 0.8, reference=ref)
    assert m.stem[0].out_channels == 16  # still half of the original 32, not half of half

    m = MODELS.get("senet_small")()
    for _ in range(2):
        _prune(m, (3, 16, 16), pruning.Guards(), 0.8)
    assert m.stem[0].out_channels == 8  # without the reference each pruner sees a fresh 'original'
