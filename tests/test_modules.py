"""compress.modules: the one pattern rule every recipe field uses (ignore, ratios, rates) and the
lookups by dotted name."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.modules import get_tensor, match_any, matches, output_layer, tensor_owner


@pytest.mark.parametrize("name, pattern", [
    ("fc.weight", "fc"),                        # a tensor of the named module
    ("fc", "fc"),                               # exact name
    ("layer1.0.conv1", "layer1"),               # a parent prefix, any depth
    ("layer1.0.conv1.weight", "layer1"),
    ("layer1.0.conv1", "layer1.0"),
    ("features.3", "features.*"),               # glob on the whole name
    ("features.3.weight", "features.*"),        # '*' crosses dots (fnmatch)
    ("head.fc", "*.fc"),
    ("blocks.0.attn.q_proj", "blocks.?.attn.*"),
    ("layer1.0.conv1", "layer[12].*.conv1"),
])
def test_matches(name, pattern):
    assert matches(name, pattern)


@pytest.mark.parametrize("name, pattern", [
    ("fc2.weight", "fc"),                       # a prefix of a segment is not a parent
    ("layer10.conv", "layer1"),
    ("xfc.weight", "fc"),
    ("layer1", "layer1.0"),                     # a child pattern does not match its parent
    ("features", "features.*"),                 # the glob must match the whole name
    ("fc", "*.fc"),
    ("head.fc.weight", "*.fc.bias"),
    ("Fc.weight", "fc"),                        # case-sensitive
    ("layer1.0.conv1", "conv1"),                # a suffix is not a parent (use '*.conv1')
])
def test_does_not_match(name, pattern):
    assert not matches(name, pattern)


def test_match_any():
    assert match_any("layer1.0.conv1", ["fc", "layer1"])
    assert match_any("features.0", iter(["nope", "features.*"]))  # any iterable
    assert not match_any("layer1.0.conv1", ["fc", "layer2"])
    assert not match_any("fc", [])


def test_tensor_lookups_and_output_layer():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    model.add_module("hidden", nn.Linear(2, 4))
    model.add_module("fc", nn.Linear(4, 3))
    owner, pname = tensor_owner(model, "body.0.weight")
    assert owner is model.body[0] and pname == "weight"
    assert get_tensor(model, "fc.bias") is model.fc.bias
    assert output_layer(model) == "fc"
    assert output_layer(nn.Sequential(nn.Conv2d(1, 1, 1))) is None
    with pytest.raises(AttributeError):
        get_tensor(model, "fc.nothing")
    assert isinstance(get_tensor(model, "hidden.weight"), torch.nn.Parameter)
