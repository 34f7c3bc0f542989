"""A user-defined dataset callable, used by test_data.py through ``data.dataset: module:callable``."""
import torch

from compress.data import DataBundle


def make(cfg, input_shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, *input_shape, generator=g)
    y = torch.arange(30) % 3
    return DataBundle(x[:20], y[:20], x[20:], y[20:], 3)
