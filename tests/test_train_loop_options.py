"""The training loop's options on tiny data, in process: precision, channels_last, gradient
accumulation, EMA, input shapes (tuple, dict), a task objective, step checkpoints and divergence."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from compress.errors import DivergedError, InputError
from compress.train.config import FinetuneBlock, TrainLoopConfig
from compress.train.loop import StepCheckpointing, train


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return x, y


def _loader(x, y, bs=16, seed=0):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      drop_last=True)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 4))


def _cfg(**kw):
    base = {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05}}
    base.update(kw)
    return TrainLoopConfig(**base)


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_default_options_train_and_report_throughput(one_thread):
    x, y = _data()
    m = _net()
    res = train(m, _loader(x, y), _cfg())
    assert res.steps == 2 * (96 // 16) and res.epochs_run == 2
    assert all(r["samples_per_s"] > 0 for r in res.history) and res.samples_per_s > 0
    assert res.resumed_at_step is None


def test_bf16_on_cpu_and_channels_last(one_thread):
    x, y = _data()
    m = _net()
    before = _weights(m)
    res = train(m, _loader(x, y), _cfg(precision="bf16", channels_last=True))
    assert res.history[-1]["train_loss"] == res.history[-1]["train_loss"]  # finite, not NaN
    assert not _equal(before, _weights(m))
    # back in the default memory format, so checkpoints (safetensors) and ONNX export see plain tensors
    assert m[0].weight.is_contiguous()
    assert all(v.dtype == torch.float32 for v in m.state_dict().values() if v.is_floating_point())


def test_fp16_on_cpu_is_an_input_error():
    x, y = _data()
    with pytest.raises(InputError, match="fp16 autocast needs a CUDA device"):
        train(_net(), _loader(x, y), _cfg(precision="fp16"))


def test_grad_accum_matches_one_big_batch(one_thread):
    """Two micro-batches of 8 summed into one step equal one step on the 16 samples (no BatchNorm,
    whose statistics depend on the micro-batch)."""
    x, y = _data(64)
    mk = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 4))  # noqa: E731
    torch.manual_seed(0)
    a = mk()
    b = mk()
    b.load_state_dict(a.state_dict())
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    big = DataLoader(TensorDataset(x[order], y[order]), batch_size=16)
    small = DataLoader(TensorDataset(x[order], y[order]), batch_size=8)
    ra = train(a, big, _cfg(epochs=1, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "constant"}))
    rb = train(b, small, _cfg(epochs=1, grad_accum_steps=2,
                              optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "constant"}))
    assert ra.steps == rb.steps == 4
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_ema_weights_are_the_result(one_thread):
    x, y = _data()
    plain, averaged = _net(), _net()
    train(plain, _loader(x, y), _cfg())
    train(averaged, _loader(x, y), _cfg(ema=0.9))
    assert not _equal(_weights(plain), _weights(averaged))


def test_compile_trains_like_eager(one_thread):
    """``compile: true`` runs the steps through torch.compile (inductor) and lands where eager
    training does, up to the compiled kernels' float rounding."""
    x, y = _data(32)
    eager, compiled = _net(), _net()
    cfg = dict(epochs=1, optimizer={"name": "sgd", "lr": 0.05})
    res_eager = train(eager, _loader(x, y), _cfg(**cfg))
    res = train(compiled, _loader(x, y), _cfg(compile=True, **cfg))
    if res.compile and res.compile.startswith("failed"):
        pytest.skip(f"torch.compile cannot build kernels on this machine: {res.compile}")
    assert res.compile == "on" and res_eager.compile is None
    assert res.steps == res_eager.steps == 2
    a, b = _weights(eager), _weights(compiled)
    assert not any(k.startswith("_orig_mod") for k in b)  # the module trained is the caller's, unwrapped
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4), k


class _Pairs(Dataset):
    """Two-input samples: ``((a, b), y)`` and the same as a dict."""

    def __init__(self, as_dict: bool):
        self.x, self.y = _data(64)
        self.as_dict = as_dict

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        a, b = self.x[i], -self.x[i]
        return ({"a": a, "b": b} if self.as_dict else (a, b)), self.y[i]


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(128, 4)

    def forward(self, a, b):
        return {"logits": self.fc(torch.cat([a.flatten(1), b.flatten(1)], 1))}


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_inputs(one_thread, as_dict):
    loader = DataLoader(_Pairs(as_dict), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    res = train(_TwoInputs(), loader, _cfg(epochs=1))
    assert res.steps == 4


class _SquaredError:
    """A task objective on raw outputs: what the loop trains on when one is given."""

    def __init__(self):
        self.calls = {"loss": 0, "distill_loss": 0}

    def loss(self, out, y):
        self.calls["loss"] += 1
        return F.mse_loss(out, F.one_hot(y, 4).float())

    def distill_loss(self, out, teacher_out, y, cfg):
        self.calls["distill_loss"] += 1
        return cfg.alpha * F.mse_loss(out, teacher_out) + (1 - cfg.alpha) * self.loss(out, y)


def test_objective_replaces_cross_entropy(one_thread):
    x, y = _data()
    obj = _SquaredError()
    train(_net(), _loader(x, y), _cfg(epochs=1), objective=obj)
    assert obj.calls == {"loss": 6, "distill_loss": 0}
    block = FinetuneBlock(epochs=1, distill={"alpha": 0.5, "temperature": 2.0})
    obj = _SquaredError()
    train(_net(1), _loader(x, y), block, teacher=_net(2), distill=block.distill, objective=obj)
    assert obj.calls["distill_loss"] == 6


def test_classification_distillation_is_hintons_and_the_loop_default(one_thread):
    """The loop without an objective trains classification through the task's one implementation:
    alpha * T^2 * KL(teacher || student) per sample + (1 - alpha) * cross-entropy (label-smoothed)."""
    from compress.tasks import Classification

    g = torch.Generator().manual_seed(3)
    s_out, t_out, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    block = FinetuneBlock(epochs=1, label_smoothing=0.1, distill={"alpha": 0.7, "temperature": 4.0})
    p_t, log_p_s = F.softmax(t_out / 4.0, 1), F.log_softmax(s_out / 4.0, 1)
    kl_per_sample = (p_t * (p_t.log() - log_p_s)).sum(1)
    expected = 0.7 * 16.0 * kl_per_sample.mean() + 0.3 * F.cross_entropy(s_out, y, label_smoothing=0.1)
    got = Classification(label_smoothing=0.1).distill_loss(s_out, t_out, y, block.distill)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)

    x, yy = _data()
    a, b = _net(), _net()
    train(a, _loader(x, yy), block, teacher=_net(2), distill=block.distill)
    train(b, _loader(x, yy), block, teacher=_net(2), distill=block.distill, objective=Classification(0.1))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_diverged_names_the_step_under_accumulation_and_bf16(one_thread):
    x, y = _data()
    x[40:] = float("nan")  # unshuffled: the 3rd batch of 16 holds NaNs -> micro-batch 3, optimizer step 2
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(DivergedError, match=r"at step 2 \(epoch 1.*precision bf16"):
        train(_net(), loader, _cfg(grad_accum_steps=2, precision="bf16"))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("every", [None, 4])
def test_step_checkpoint_resume_is_exact(one_thread, tmp_path, every):
    """Stopped after step 7 (mid-epoch), a new loop with the same inputs continues from the last step
    checkpoint and ends bit for bit where an uninterrupted run ends (dropout draws included)."""
    x, y = _data()
    net = lambda: nn.Sequential(_net(), nn.Dropout(0.3))  # noqa: E731
    cfg = _cfg(epochs=3, ema=0.8)
    whole = net()
    train(whole, _loader(x, y), cfg)

    ck = StepCheckpointing(tmp_path / "step.pt", every=every)

    def stop(step, model, opt):
        if step == 7:
            raise _Stop

    torch.manual_seed(123)  # the killed process's global state differs from the resumed one's
    with pytest.raises(_Stop):
        train(net(), _loader(x, y), cfg, checkpointing=ck, on_step=stop)
    saved = torch.load(ck.path, weights_only=True)
    assert saved["steps"] == (6 if every is None else 4)
    torch.manual_seed(0)
    resumed = net()
    res = train(resumed, _loader(x, y), cfg, checkpointing=ck)
    assert res.resumed_at_step == saved["steps"]
    assert _equal(_weights(whole), _weights(resumed))


@pytest.mark.parametrize("stage, field", [
    ({"kind": "train", "precision": "fp16"}, "stages[0].precision"),
    ({"kind": "prune", "finetune_between": {"precision": "fp16"}}, "stages[0].finetune_between.precision"),
])
def test_fp16_recipe_on_cpu_is_refused_before_running(tmp_path, stage, field):
    import yaml

    from compress.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "device": "cpu", "model": {"factory": "small_cnn", "input_shape": [1, 8, 8]},
                                 "stages": [stage]}))
    with pytest.raises(InputError) as e:
        load_recipe(p, [])
    assert e.value.field == field and "fp16 autocast needs a CUDA device" in str(e.value)
    stage_bf16 = yaml.safe_load(yaml.safe_dump(stage).replace("fp16", "bf16"))
    p.write_text(yaml.safe_dump({"name": "x", "device": "cpu", "model": {"factory": "small_cnn", "input_shape": [1, 8, 8]},
                                 "stages": [stage_bf16]}))
    load_recipe(p, [])
