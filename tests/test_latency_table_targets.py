"""The latency table for another target backend (TensorRT: built from engines, keyed by GPU and
TensorRT version). No GPU here, so the table-building logic is checked with an *injected* table (the
JSON cache filled with known numbers, not measurements): keys keep machines apart, a cached table is
used without measuring, and the allocator follows the injected numbers."""
from __future__ import annotations

import json

import torch
from torch import nn

from compress.search.allocator import ChannelGroup, allocate, allowed_widths, layer_latency
from compress.search.latency_table import LatencyPredictor, LatencyTable, key_string, machine_key

torch.set_num_threads(1)
H200 = {"gpu": "NVIDIA H200", "tensorrt": "10.9.0"}
A100 = {"gpu": "NVIDIA A100-SXM4-80GB", "tensorrt": "10.9.0"}


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


def _inject(path, model, device, per_channel: dict[str, float]):
    """Fill a table cache with known per-layer numbers: layer time = per_channel[layer] * cin * cout."""
    table = LatencyTable(path, "tensorrt", 8, 1, device=device)
    prunable = {"a.out", "b.in", "b.out", "fc.in"}
    pred = LatencyPredictor(model, (3, 8, 8), table, prunable, (0.25, 0.5, 0.75, 1.0))
    for sig, shape in pred.grid_signatures(model):
        layer = "a" if sig.startswith("conv|3|") else "b" if sig.startswith("conv|") else "fc"
        ci, co = int(sig.split("|")[1]), int(sig.split("|")[2])
        table.layers[sig] = per_channel[layer] * ci * co
        table.layers["empty|" + "x".join(str(d) for d in shape)] = 0.0
    table.save()


def test_tensorrt_keys_keep_gpus_and_versions_apart():
    k1, k2 = machine_key("tensorrt", 8, 1, H200), machine_key("tensorrt", 8, 1, A100)
    assert k1["gpu"] == "NVIDIA H200" and key_string(k1) != key_string(k2)
    assert key_string(machine_key("tensorrt", 8, 1, H200)) != key_string(machine_key("tensorrt", 16, 1, H200))
    # no GPU here: a CPU backend's key carries no accelerator
    assert "gpu" not in machine_key("onnxruntime", 8, 1)


def test_injected_tensorrt_table_drives_the_allocator_without_measuring(tmp_path):
    torch.manual_seed(0)
    model = Two().eval()
    path = tmp_path / "latency_table.json"
    _inject(path, model, H200, {"a": 0.001, "b": 0.01, "fc": 0.0001})

    table = LatencyTable(path, "tensorrt", 8, 1, device=H200)
    prunable = {"a.out", "b.in", "b.out", "fc.in"}
    pred = LatencyPredictor(model, (3, 8, 8), table, prunable, (0.25, 0.5, 0.75, 1.0))
    assert pred.warm(model) == 0 and table.measured == 0  # every entry came from the cache
    # b dominates: 0.01 * 32 * 32 = 10.24 of 10.24 + 0.096 + 0.032
    assert pred.layers_ms(model) == sum([0.001 * 3 * 32, 0.01 * 32 * 32, 0.0001 * 32 * 10])

    groups = [ChannelGroup("a", 32, allowed_widths(32, 8, 8), [1.0] * 32, ["a.out", "b.in"]),
              ChannelGroup("b", 32, allowed_widths(32, 8, 8), [1.0] * 32, ["b.out", "fc.in"])]
    lat = layer_latency(groups, pred)
    dense = lat.total([32, 32])
    alloc = allocate(groups, lat, 0.5 * dense)
    # equal importances: a channel of group a saves 0.003 + 0.01 * 32 ms (a and b), one of group b saves
    # 0.01 * w_a + 0.001 (b and fc): a is cheaper per ms at every step until its floor (8) -- 2.616 ms,
    # within 5.184; giving 8 channels back to a would add 2.584 ms and break the limit, so it stays
    assert alloc.widths == [8, 32]
    assert alloc.predicted_ms == sum([0.001 * 3 * 8, 0.01 * 8 * 32, 0.0001 * 32 * 10])

    # the same cache on another GPU is a different entry: nothing is reused, so it would be measured
    other = LatencyTable(path, "tensorrt", 8, 1, device=A100)
    other.save()
    assert other.layers == {} and len(json.loads(path.read_text())) == 2
