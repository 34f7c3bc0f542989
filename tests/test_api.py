"""The Python API (compress.prune / sparsify / finetune / strip / save / load / export_onnx /
check_sparsity / run): plain results, typed errors (never SystemExit), masks that hold in the
caller's own training loop after loading in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from compress.errors import GateError, InputError
from compress.sparsity import masks

from conftest import REPO, tiny_recipe


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _net():
    from compress.model_io import build_model

    torch.manual_seed(0)
    return build_model("small_cnn", {"num_classes": 10, "in_channels": 1, "width": 16})


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def test_prune_sparsify_finetune_save_load_export(tmp_path, one_thread):
    model = _net()
    x = torch.randn(2, 1, 8, 8)
    teacher = _net().eval()
    res = compress.prune(model, x[:1], importance="l2", ratio=0.5, scope="uniform")
    assert isinstance(res, compress.api.PruneResult) and res.model is model
    assert res.params_after < res.params_before and 0 < res.macs_kept < 1
    assert res.metrics["guards"]["bound"][0]["guard"] == "classifier"

    sp = compress.sparsify(model, "2:4")
    assert sp.layers and abs(sp.sparsity - 0.5) < 1e-6 and sp.pattern == "2:4"

    ft = compress.finetune(model, teacher, _data(), epochs=1, lr=0.01, optimizer="adamw", weight_decay=0.05)
    assert ft.steps == 4 and ft.train_loss is not None and ft.model is model
    assert all(float(d) == 0.5 for d in masks.density(model).values())  # masks held through the loop
    for _, mod, pname, mask in masks.iter_masks(model):
        assert bool((getattr(mod, pname)[mask == 0] == 0).all())

    saved = compress.save(model, tmp_path / "ckpt")  # the model knows its factory
    back = compress.load(saved)
    model.eval()
    assert torch.equal(back(x), model(x))
    assert masks.density(back) == masks.density(model)

    exp = compress.export_onnx(model, tmp_path / "m.onnx", x)
    assert exp.path.is_file() and exp.parity is not None and exp.parity < 1e-4
    assert masks.has_masks(model)  # exporting baked a copy, not the model
    rep = compress.check_sparsity(exp.path, require="all")
    assert rep.sparse_layers == rep.eligible_layers > 0 and rep.require["met"]


def test_sparsegpt_reads_calibration_and_strip_bakes(one_thread):
    model = _net()
    res = compress.sparsify(model, "2:4", method="sparsegpt", calibration=_data())
    assert res.method == "sparsegpt" and res.layers
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}
    plain = compress.strip(model)
    assert plain is model and not masks.has_masks(model)
    assert not any(k.endswith("_mask") for k in model.state_dict())
    assert all(not m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the zeros were already there: baked, nothing else moved


def test_typed_errors_never_system_exit(tmp_path):
    model = _net()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(InputError) as ei:
        compress.prune(model, x, importance="nope")
    assert ei.value.field == "importance"
    with pytest.raises(InputError) as ei:
        compress.prune(model, x, ratio=1.5)
    assert ei.value.field == "ratio"
    with pytest.raises(InputError) as ei:
        compress.prune(model, x, importance="taylor")  # data-aware without calibration data
    assert ei.value.field == "calibration"
    with pytest.raises(InputError) as ei:
        compress.prune(model, "not a tensor")
    assert ei.value.field == "example_inputs"
    with pytest.raises(InputError) as ei:
        compress.sparsify(model, "5:4")
    assert ei.value.field == "pattern"
    with pytest.raises(InputError) as ei:
        compress.sparsify(model, method="sparsegpt")
    assert ei.value.field == "calibration"
    with pytest.raises(InputError) as ei:
        compress.finetune(model, None, _data(), lr=-1)
    assert ei.value.field == "lr"
    with pytest.raises(InputError) as ei:
        compress.check_sparsity(tmp_path / "missing.onnx")
    assert "does not exist" in str(ei.value)
    with pytest.raises(InputError) as ei:
        compress.save(nn.Linear(4, 4), tmp_path / "x")
    assert ei.value.field == "factory"
    with pytest.raises(InputError):
        compress.load(tmp_path / "nowhere")
    with pytest.raises(InputError):
        compress.run(tmp_path / "missing.yaml")


def test_check_sparsity_require_raises_gate_with_report(tmp_path, one_thread):
    model = _net()
    path = compress.export_onnx(model, tmp_path / "dense.onnx", torch.randn(1, 1, 8, 8), check=False).path
    with pytest.raises(GateError) as ei:
        compress.check_sparsity(path, require="all")
    assert ei.value.report.sparse_layers == 0 and ei.value.report.require["met"] is False


def test_run_returns_summary_and_takes_a_pruned_checkpoint(tmp_path, write_recipe, one_thread):
    """A model pruned with the API, saved, and fed back into a recipe as model.checkpoint: DIR."""
    model = _net()
    compress.prune(model, torch.randn(1, 1, 8, 8), ratio=0.5)
    ckpt = compress.save(model, tmp_path / "pruned")
    r = tiny_recipe(stages=[{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
                            {"kind": "sparsify", "pattern": "2:4"}])
    r["model"]["checkpoint"] = str(ckpt)
    res = compress.run(write_recipe(r), out=tmp_path / "run")
    assert res.status == "passed" and res.run_dir == tmp_path / "run"
    assert res.summary["stages"][0].get("skipped") == "model.checkpoint given"
    assert res.summary["dense"]["params"] == sum(p.numel() for p in model.parameters())  # the pruned widths
    final = res.model()
    assert masks.has_masks(final)
    other = tiny_recipe(model={"factory": "resnet20", "kwargs": {"num_classes": 10}, "input_shape": [1, 8, 8],
                               "checkpoint": str(ckpt)})
    with pytest.raises(InputError) as ei:  # a folder built by another factory is refused, not called
        compress.run(write_recipe(other, "other.yaml"), out=tmp_path / "run2")
    assert ei.value.field == "model.checkpoint"


LOOP = textwrap.dedent("""
    import sys, torch
    import compress
    from compress.sparsity import masks
    model = compress.load(sys.argv[1])
    masked = [(n, mod, mask) for n, mod, _, mask in masks.iter_masks(model)]
    kinds = {type(mod).__name__ for _, mod, _ in masked}
    assert kinds == {"Conv2d", "Linear"}, kinds
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    }[sys.argv[2]]
    opt = make(model.parameters())
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for n, mod, mask in masked:  # checked right after the step, before any forward re-zeroes
            w = mod.weight
            assert bool((w[mask == 0] == 0).all()), (sys.argv[2], n, step)
            assert bool((w[mask == 1] != 0).any()), n
    print("held", sys.argv[2], len(masked))
""")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_masks_hold_in_a_user_loop_after_load_in_a_fresh_process(tmp_path, optimizer, one_thread):
    model = _net()
    compress.sparsify(model, "2:4")
    ckpt = compress.save(model, tmp_path / "ckpt")
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    res = subprocess.run([sys.executable, str(script), str(ckpt), optimizer], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().startswith(f"held {optimizer}")


def test_masks_hold_after_deepcopy_and_old_checkpoints_still_load(tmp_path):
    """A deep copy gets fresh Parameters: the forward pre-hook gives them their gradient hooks.
    state_dict keys are the ones run directories always had (``weight``, ``weight_mask``)."""
    import copy

    model = _net()
    compress.sparsify(model, "2:4")
    keys = set(model.state_dict())
    assert any(k.endswith(".weight_mask") for k in keys) and not any("parametrizations" in k for k in keys)
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    loss = twin(torch.randn(4, 1, 8, 8)).square().mean()
    loss.backward()
    opt.step()
    for _, mod, pname, mask in masks.iter_masks(twin):
        assert bool((getattr(mod, pname)[mask == 0] == 0).all())
