"""Data-aware paths take the batches the training loop takes: inputs as a dict of tensors
(``input_ids`` + ``attention_mask``, as a tokenizer gives them) or a tuple of tensors. A small
token classifier is fed the same items both ways; every calibration consumer must get the same
numbers from both. (tests/test_tasks.py runs Taylor pruning and SparseGPT on a BERT classifier
with dict batches through ``compress run``.)"""
from __future__ import annotations

import torch
from torch import nn

from compress.metrics import batch_inputs, slice_batch
from compress.sparsity.at_init import grasp_scores, snip_scores
from compress.sparsity.sparsegpt import sparsegpt_masks
from compress.structured import criteria


class TokenClassifier(nn.Module):
    """Mean of the attended tokens' embeddings, then two Linear layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 20, (6, 5), generator=g)
        mask = torch.ones(6, 5, dtype=torch.long)
        mask[:, 4] = 0
        out.append((ids, mask, torch.randint(0, 3, (6,), generator=g)))
    as_dict = [({"input_ids": i, "attention_mask": m}, y) for i, m, y in out]
    as_tuple = [((i, m), y) for i, m, y in out]
    return as_dict, as_tuple


def test_batch_helpers_slice_and_pick_inputs():
    ids = torch.arange(12).reshape(4, 3)
    assert torch.equal(slice_batch({"input_ids": ids}, 1, 2)["input_ids"], ids[1:2])
    assert [t.shape[0] for t in slice_batch((ids, ids), 0, 3)] == [3, 3]
    assert batch_inputs(({"input_ids": ids}, torch.zeros(4))) == {"input_ids": ids}
    assert batch_inputs({"input_ids": ids}) == {"input_ids": ids}


def test_data_aware_criteria_take_dict_and_tuple_batches():
    as_dict, as_tuple = _batches()
    grads = {}
    for form, batches in (("dict", as_dict), ("tuple", as_tuple)):
        model = TokenClassifier()
        taylor = criteria.IMPORTANCES.get("taylor")
        criteria.calibrate(taylor, taylor.build(), model, batches, "cpu")
        grads[form] = model.fc1.weight.grad.clone()
        hessian = criteria.IMPORTANCES.get("hessian")
        imp = hessian.build()
        criteria.calibrate(hessian, imp, model, batches, "cpu")   # per-sample gradients: sliced batches
        grads[form + "_fisher"] = imp._accu_grad[model.fc1.weight].clone()
        kfac = criteria.IMPORTANCES.get("kfac")
        imp = kfac.build()
        criteria.calibrate(kfac, imp, model, batches, "cpu")
        assert imp.samples == 12
        grads[form + "_kfac"] = imp.factors(model.fc1)[1].clone()
        obs = criteria.IMPORTANCES.get("obs")
        imp = obs.build()
        criteria.calibrate(obs, imp, model, batches, "cpu")
        grads[form + "_obs"] = imp.fisher(model.fc1).clone()
    for key in ("", "_fisher", "_kfac", "_obs"):
        assert grads["dict" + key].abs().sum() > 0
        assert torch.allclose(grads["dict" + key], grads["tuple" + key], rtol=1e-5, atol=1e-7)


def test_snip_grasp_and_sparsegpt_take_dict_batches():
    as_dict, as_tuple = _batches()
    names = ["fc1.weight", "fc2.weight"]
    for scores in (snip_scores, grasp_scores):
        a, b = scores(TokenClassifier(), names, as_dict), scores(TokenClassifier(), names, as_tuple)
        assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-8) and a[n].abs().sum() > 0 for n in names)
    masks = []
    for batches in (as_dict, as_tuple):
        model = TokenClassifier()
        masks.append(sparsegpt_masks(model, {"fc1": model.fc1}, batches, 2, 4, block=4)["fc1"])
    assert torch.equal(masks[0], masks[1])
    assert (masks[0].reshape(16, 2, 4).sum(-1) == 2).all()   # 2:4 along the input dimension


def test_torch_benchmark_backend_runs_a_dict_input_model():
    """The torch backend times the model on a real item's inputs (here both a model needs),
    repeated to the batch size, not on a random tensor of ``input_shape``."""
    from compress.deploy.backends import BACKENDS

    as_dict, _ = _batches()
    one = {k: v[:1] for k, v in as_dict[0][0].items()}   # one real item, as the benchmark stage passes it
    seen = []
    model = TokenClassifier()
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append((sorted(kwargs), out.shape[0])),
                                with_kwargs=True)
    run = BACKENDS.get("torch")(None, model, None, 4, {"example": one, "threads": 1})
    run()
    assert seen and all(s == (["attention_mask", "input_ids"], 4) for s in seen)


class _TokenBN(nn.Module):
    """Token ids + mask -> mean embedding -> Linear -> BatchNorm1d -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc1, self.bn, self.fc2 = nn.Embedding(20, 8), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def features(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.fc1((self.emb(input_ids) * m).sum(1) / m.sum(1))

    def forward(self, input_ids, attention_mask):
        return self.fc2(torch.relu(self.bn(self.features(input_ids, attention_mask))))


def test_search_batchnorm_recalibration_takes_dict_and_tuple_batches():
    from compress.search.candidates import recalibrate_batchnorm

    as_dict, as_tuple = _batches()
    stats = {}
    for form, batches in (("dict", as_dict), ("tuple", as_tuple)):
        model = _TokenBN()
        recalibrate_batchnorm(model, batches, batches=2, device="cpu")
        assert not model.training and model.bn.momentum == 0.1
        stats[form] = model.bn.running_mean.clone()
    with torch.no_grad():  # cumulative average of the two batches' means (momentum None)
        model = _TokenBN()
        expected = torch.stack([model.features(**x).mean(0) for x, _ in as_dict]).mean(0)
    assert torch.allclose(stats["dict"], expected, atol=1e-6)
    assert torch.equal(stats["dict"], stats["tuple"])
