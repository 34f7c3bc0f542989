"""Shared fixtures: run the CLI in a subprocess (the real entry point, real exit codes) and write
small recipes. Tests never touch ../shared: data is digits (bundled with scikit-learn) or synthetic."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m compress ARGS`` with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_recipe(**overrides) -> dict:
    """A fast full-chain recipe on digits with a narrow small_cnn (a few seconds)."""
    r = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "model": {"factory": "small_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 16},
                  "input_shape": [1, 8, 8]},
        "data": {"dataset": "digits", "batch_size": 64},
        "stages": [
            {"kind": "train", "epochs": 3, "optimizer": {"name": "sgd", "lr": 0.1}},
            {"kind": "prune", "importance": "l2", "ratio": 0.5, "scope": "global"},
            {"kind": "finetune", "epochs": 1, "distill": {"alpha": 0.7, "temperature": 4.0}},
            {"kind": "sparsify", "pattern": "2:4"},
            {"kind": "finetune", "epochs": 1, "optimizer": {"lr": 0.005}},
            {"kind": "export", "onnx": {"opset": 17}},
            {"kind": "benchmark", "batch_sizes": [1], "iters": 20, "rounds": 2, "warmup": 2},
        ],
        # a 3-epoch net pruned by half and fine-tuned for 1 epoch drops a few points: the default
        # max_accuracy_drop (1.0 pp) is off here on purpose; tests of the gates set their own
        "gates": {"max_accuracy_drop": None},
    }
    r.update(overrides)
    return r


@pytest.fixture
def write_recipe(tmp_path):
    def _write(data: dict | str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return p

    return _write


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models train faster on one thread than on two fighting over a shared, loaded CPU (here and
    in CLI subprocesses, which inherit OMP_NUM_THREADS)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def xy(dataset):
    """All ``(inputs, targets)`` of a small dataset stacked into two tensors (tests only)."""
    import torch

    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(list(xs)), torch.stack([torch.as_tensor(y) for y in ys])
