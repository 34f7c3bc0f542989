"""Every channel-pruning criterion and the registry that holds them, :data:`IMPORTANCES`.

A criterion scores each channel ``c`` of a Torch-Pruning *group* (all layers that lose channel ``c``
together: producer rows ``W[c, ...]``, BatchNorm/LayerNorm ``gamma[c]``, consumer columns
``W[:, c, ...]``). Unless stated otherwise a criterion computes a per-layer score ``s_l(c)``, the
group score is the mean over the group's layers ``s(c) = mean_l s_l(c)`` and the group is then
normalised by its mean ``s(c) / mean_c s(c)`` so that ``scope: global`` can rank across groups
(Torch-Pruning's ``group_reduction="mean", normalizer="mean"``). ``docs/criteria.md`` has the table.

Data-aware criteria are prepared by ``Criterion.calibrate`` (or ``needs``) on calibration batches
from the training split; the loss is the task's (``loss(output, targets)``: the segmentation task's
per-pixel cross-entropy at the label size, ignored pixels left out), by default the cross-entropy
of the model's logits. Torch-Pruning classes are used where they are correct; where Torch-Pruning 1.6.1 is
missing a criterion or gets it wrong (noted in each class) the class here is its Importance subclass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F
from torch_pruning.pruner import function as tpf

from ..metrics import logits_of
from ..registry import Registry
from . import tp_compat

@dataclass(frozen=True)
class Criterion:
    """A pruning criterion: how to build the Torch-Pruning importance, and whether it needs data.

    ``needs`` is ``None`` (data-free), ``"grad"`` (accumulate dL/dw over calibration batches before
    scoring) or ``"hessian"`` (per-sample gradient accumulation for the diagonal Hessian / Fisher)."""

    build: Callable[..., tp.importance.Importance]
    needs: str | None = None
    doc: str = ""
    # Optional custom calibration: (importance, model, batches, device, loss) -> None. Used instead of
    # accumulate_gradients for criteria that need activations/curvature (kfac, obs).
    calibrate: Callable[..., None] | None = None


IMPORTANCES: Registry[Criterion] = Registry("importance")


def logits_cross_entropy(output, targets: torch.Tensor) -> torch.Tensor:
    """The default calibration loss: cross-entropy of the model's logits against the labels."""
    return F.cross_entropy(logits_of(output), targets)


def calibrate(criterion: Criterion, importance, model: nn.Module, batches, device, loss=None) -> None:
    """Prepare a data-aware criterion on calibration batches (no-op for data-free ones). ``loss``:
    ``loss(raw model output, targets) -> scalar``, the task's loss (default: logits cross-entropy).
    It must be the task's own: a segmentation model predicting at 1/4 resolution has no plain
    cross-entropy against full-size label maps."""
    loss = loss or logits_cross_entropy
    if criterion.calibrate is not None:
        criterion.calibrate(importance, model, batches, device, loss)
    elif criterion.needs:
        accumulate_gradients(model, batches, device, criterion.needs, importance, loss)


def accumulate_gradients(model: nn.Module, batches, device, needs: str, imp=None, loss_fn=None) -> None:
    """Run calibration batches forward/backward so data-aware criteria can read ``.grad``."""
    loss_fn = loss_fn or logits_cross_entropy
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()  # BN statistics must not move while we score
    if needs == "hessian" and imp is not None and hasattr(imp, "zero_grad"):
        imp.zero_grad()  # once: the estimate is the mean over every calibration sample
    for xb, yb in batches:
        xb, yb = xb.to(device), yb.to(device)
        if needs == "hessian" and imp is not None and hasattr(imp, "accumulate_grad"):
            for i in range(len(xb)):  # per-sample squared gradients for the diagonal estimate
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb[i: i + 1]), yb[i: i + 1])
                loss.backward()
                imp.accumulate_grad(model)
        else:
            loss = loss_fn(model(xb), yb)
            loss.backward()
    model.train(was)


_OUT = (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels)
_IN = (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels)
_NORM = (tpf.prune_batchnorm_out_channels, tpf.prune_layernorm_out_channels)


def channel_rows(layer: nn.Module, prune_fn, idxs, t: torch.Tensor) -> torch.Tensor | None:
    """Rearrange a weight-shaped tensor ``t`` (the weight, its gradient, a Fisher diagonal) so that
    row ``k`` holds every entry that belongs to channel ``idxs[k]`` of this dependency; the same
    slicing as Torch-Pruning's magnitude criterion (grouped convs repeat the per-group slice)."""
    transposed = getattr(layer, "transposed", False)
    if prune_fn in _OUT:
        return (t.transpose(0, 1) if transposed else t)[idxs].flatten(1)
    if prune_fn in _IN:
        rows = (t if transposed else t.transpose(0, 1)).flatten(1)
        groups = getattr(layer, "groups", 1)
        if prune_fn == tpf.prune_conv_in_channels and groups not in (1, layer.in_channels):
            rows = rows.repeat(groups, 1)
        return rows[idxs]
    if prune_fn in _NORM:
        return t[idxs].unsqueeze(1)
    return None


def _has_affine(layer: nn.Module) -> bool:
    return getattr(layer, "affine", getattr(layer, "elementwise_affine", True)) and getattr(layer, "weight", None) is not None


class _ElementwiseImportance(tp.importance.GroupMagnitudeImportance):
    """Group score from an elementwise function of (weight, companion tensor), summed per channel:
    ``s_l(c) = sum_{i in channel c of layer l} f(w_i, g_i)``. Subclasses define ``f`` and ``companion``."""

    def __init__(self, target_types=(nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
        super().__init__(p=2, group_reduction="mean", normalizer="mean", bias=False, target_types=list(target_types))

    def companion(self, layer: nn.Module) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def f(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, group):
        imps, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            if not isinstance(layer, tuple(self.target_types)) or not _has_affine(layer):
                continue
            g = self.companion(layer)
            if g is None:
                continue
            w_rows = channel_rows(layer, fn, idxs, layer.weight.data)
            if w_rows is None:
                continue
            imps.append(self.f(w_rows, channel_rows(layer, fn, idxs, g)).sum(1))
            roots.append(group[i].root_idxs)
        if not imps:
            return None
        return tp_compat.reduce_and_normalize(self, imps, roots)


class TaylorImportance(_ElementwiseImportance):
    """First-order Taylor (Molchanov et al. 2019): ``s_l(c) = sum_i |w_i * dL/dw_i|``, the gradient
    accumulated over the calibration batches. Same formula as Torch-Pruning's GroupTaylorImportance,
    which in 1.6.1 skips BatchNorm (it tests for the GroupNorm handler); here BN's gamma counts too."""

    def companion(self, layer):
        return None if layer.weight.grad is None else layer.weight.grad.data

    def f(self, w, g):
        return (w * g).abs()


class FisherOBDImportance(tp.importance.GroupHessianImportance):
    """Optimal Brain Damage (LeCun et al. 1990) with the diagonal empirical Fisher as the Hessian:
    ``s_l(c) = sum_i F_ii w_i^2``, ``F_ii = 1/N sum_n (d l_n / d w_i)^2`` over N calibration samples
    (per-sample gradients; the 1/2 of OBD is a constant and dropped).

    Torch-Pruning 1.6.1's ``accumulate_grad`` keys its buffers by parameter but tests membership by
    name, so every sample overwrites the sum and only the last sample's gradient survives; this
    subclass accumulates correctly and keeps the rest of GroupHessianImportance."""

    def accumulate_grad(self, model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                g2 = p.grad.detach().pow(2)
                if p in self._accu_grad:
                    self._accu_grad[p] += g2
                    self._counter[p] += 1
                else:
                    self._accu_grad[p] = g2.clone()
                    self._counter[p] = 1


class FPGMImportance(tp.importance.GroupMagnitudeImportance):
    """Filter pruning via geometric median (He et al. 2019): a channel close to all others is
    redundant. ``s_l(c) = sum_j ||w_c - w_j||_2`` over the channels ``j`` of the same layer (rows for
    producers, input slices for consumers; norms carry no distance information and are skipped).
    Torch-Pruning 1.6.1's FPGMImportance measures distances between ``|w|^2`` (sign and scale lost);
    this uses the weights themselves, as in the paper."""

    def __init__(self):
        super().__init__(p=2, group_reduction="mean", normalizer="mean", bias=False,
                         target_types=[nn.modules.conv._ConvNd, nn.Linear])

    @torch.no_grad()
    def __call__(self, group):
        imps, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            if not isinstance(layer, tuple(self.target_types)) or fn not in _OUT + _IN:
                continue
            rows = channel_rows(layer, fn, idxs, layer.weight.data)
            imps.append(torch.cdist(rows.unsqueeze(0), rows.unsqueeze(0)).squeeze(0).sum(1))
            roots.append(group[i].root_idxs)
        if not imps:
            return None
        return tp_compat.reduce_and_normalize(self, imps, roots)


# ---------------------------------------------------------------- curvature (kfac, obs)

def _eligible(m: nn.Module) -> bool:
    """Layers whose per-sample gradient is ``sum_l ds_l a_l^T`` over unfolded positions ``l``."""
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _unfold_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as (batch, positions, features) with features in ``weight.flatten(1)`` order."""
    if isinstance(m, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return cols.transpose(1, 2)


def _grad_output(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradient as (batch, positions, out_features)."""
    if isinstance(m, nn.Linear):
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.flatten(2).transpose(1, 2)


class _CurvatureImportance(tp.importance.Importance):
    """Collects, per eligible Conv2d/Linear, statistics of the layer input ``a`` and the per-sample
    output gradient ``ds`` (loss of one sample) over the calibration batches."""

    def __init__(self):
        self.stats: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self.samples = 0

    def accumulate(self, m: nn.Module, a: torch.Tensor, ds: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def calibrate(self, model: nn.Module, batches, device, loss_fn=None) -> None:
        """Forward/backward every calibration batch, hooks capture ``a`` and ``ds``."""
        loss_fn = loss_fn or logits_cross_entropy
        self.stats, self.samples = {}, 0
        layers = [m for m in model.modules() if _eligible(m)]

        def fwd(m, args, out):
            if not out.requires_grad:
                return None
            x = args[0].detach()
            # The network continues with a copy, so in-place ops after the layer (ReLU(inplace=True))
            # cannot invalidate the tensor whose gradient we hook.
            out.register_hook(lambda g, m=m, x=x: self._on_grad(m, x, g))
            return out.clone()

        handles = [m.register_forward_hook(fwd) for m in layers]
        was = model.training
        model.eval()  # BN statistics must not move while we measure
        try:
            for xb, yb in batches:
                xb, yb = xb.to(device), yb.to(device)
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                self._batch = len(xb)
                loss.backward()
                self.samples += len(xb)
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
            model.train(was)

    @torch.no_grad()
    def _on_grad(self, m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        # The loss is a batch mean: the gradient of sample n's own loss is batch * g[n].
        self.accumulate(m, _unfold_input(m, x).float(), _grad_output(m, g).float() * self._batch)


class KFACImportance(_CurvatureImportance):
    """OBD with Kronecker-factored curvature (EigenDamage's KFAC-OBD, Wang et al. 2019; KFC,
    Grosse & Martens 2016). Per layer the Fisher is ``A (x) S`` with ``A = E[a a^T]`` (inputs,
    averaged over positions) and ``S = E_n[sum_l ds_l ds_l^T]`` (per-sample output gradients).
    Removing output row ``c``: ``s_l(c) = 1/2 S_cc w_c^T A w_c``. Removing input channel ``c``
    (columns ``B_c``, the ``kh*kw`` entries of the channel): ``s_l(c) = 1/2 tr(W_Bc^T S W_Bc A_BcBc)``.
    Norm layers and grouped convs carry no Kronecker factors and are not scored (their group is
    scored through its convs/linears). Torch-Pruning's OBDCImportance is not used: despite the name it
    uses a diagonal per-sample Fisher (no Kronecker factors), only scores output channels and indexes
    its Fisher without the channel indices (it fails when a layer has a bias)."""

    def accumulate(self, m, a, ds):
        st = self.stats.setdefault(m, {"A": 0.0, "S": 0.0, "positions": a.shape[1]})
        st["A"] = st["A"] + torch.einsum("nld,nle->de", a, a) / a.shape[1]
        st["S"] = st["S"] + torch.einsum("nlo,nlp->op", ds, ds)

    def factors(self, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.stats[m]
        return st["A"] / self.samples, st["S"] / self.samples

    @torch.no_grad()
    def __call__(self, group):
        imps, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            m, fn = dep.target.module, dep.handler
            if m not in self.stats:
                continue
            A, S = self.factors(m)
            W = m.weight.data.flatten(1).float()
            if fn in _OUT:
                rows = W[idxs]
                local = 0.5 * S.diagonal()[idxs] * torch.einsum("cd,de,ce->c", rows, A, rows)
            elif fn in _IN:
                kk = W.shape[1] // _in_features(m)
                Wb = W.view(W.shape[0], -1, kk)[:, idxs]                       # (out, c, kk)
                Ab = _diag_blocks(A, kk)[idxs]                                  # (c, kk, kk)
                local = 0.5 * torch.einsum("ock,op,cpl,clk->c", Wb, S, Wb.transpose(0, 1), Ab)
            else:
                continue
            imps.append(local)
            roots.append(group[i].root_idxs)
        if not imps:
            return None
        return _mean_normalised(imps, roots)


class OBSImportance(_CurvatureImportance):
    """Optimal Brain Surgeon (Hassibi & Stork 1993) with the WoodFisher estimate (Singh & Alistarh
    2020): the empirical Fisher ``F = 1/(N*out) sum_n G_n^T G_n + lambda*mean(diag) I`` over a layer's
    input dimension (``G_n`` = per-sample weight gradient; rows share one Fisher, a block-diagonal
    approximation), ``lambda`` = ``obs_dampening``. Removing a channel removes the columns ``B_c`` of
    every consumer layer; OBS gives the loss increase with optimal compensation of the other columns:
    ``s_l(c) = 1/2 sum_r W_{r,Bc} [(F^-1)_BcBc]^-1 W_{r,Bc}^T``. A group without a consumer (channel
    leaves the network) uses the producer rows, ``s_l(c) = 1/2 w_c^T F w_c`` (OBS with block-diagonal
    rows has no compensation there). With ``update=True`` the surviving consumer columns get the OBS
    update ``W <- W - W_S [(F^-1)_SS]^-1 (F^-1)_S,:`` for the pruned set ``S`` before it is removed."""

    def __init__(self, dampening: float = 0.01, update: bool = False):
        super().__init__()
        self.dampening = dampening
        self.update = update
        self._inverse: dict[nn.Module, torch.Tensor] = {}

    def accumulate(self, m, a, ds):
        G = torch.einsum("nlo,nld->nod", ds, a)                                 # per-sample gradients
        st = self.stats.setdefault(m, {"F": 0.0})
        st["F"] = st["F"] + torch.einsum("nod,noe->de", G, G) / G.shape[1]

    def calibrate(self, model, batches, device, loss_fn=None) -> None:
        self._inverse = {}
        super().calibrate(model, batches, device, loss_fn)

    def fisher(self, m: nn.Module) -> torch.Tensor:
        Fm = self.stats[m]["F"] / self.samples
        damp = self.dampening * Fm.diagonal().mean().clamp_min(1e-12)
        return Fm + damp * torch.eye(Fm.shape[0], dtype=Fm.dtype, device=Fm.device)

    def fisher_inverse(self, m: nn.Module) -> torch.Tensor:
        if m not in self._inverse:
            self._inverse[m] = torch.cholesky_inverse(torch.linalg.cholesky(self.fisher(m).double()))
        return self._inverse[m]

    @torch.no_grad()
    def __call__(self, group):
        consumers, producers = [], []
        for i, (dep, idxs) in enumerate(group):
            m, fn = dep.target.module, dep.handler
            if m not in self.stats:
                continue
            if fn in _IN:
                Finv = self.fisher_inverse(m)
                kk = Finv.shape[0] // _in_features(m)
                W = m.weight.data.flatten(1).double().view(m.weight.shape[0], -1, kk)[:, idxs]  # (out, c, kk)
                M = torch.linalg.inv(_diag_blocks(Finv, kk)[idxs])                               # (c, kk, kk)
                consumers.append((0.5 * torch.einsum("ock,ckl,ocl->c", W, M, W).float(), group[i].root_idxs))
            elif fn in _OUT:
                rows = m.weight.data.flatten(1)[idxs].double()
                Fm = self.fisher(m).double()
                producers.append((0.5 * torch.einsum("cd,de,ce->c", rows, Fm, rows).float(), group[i].root_idxs))
        chosen = consumers or producers
        if not chosen:
            return None
        return _mean_normalised([s for s, _ in chosen], [r for _, r in chosen])

    @torch.no_grad()
    def before_prune(self, group) -> None:
        """OBS compensation of the consumer layers for the channels this group is about to lose."""
        if not self.update:
            return
        for dep, idxs in group:
            m = dep.target.module
            if dep.handler not in _IN or m not in self.stats or not len(idxs):
                continue
            Finv = self.fisher_inverse(m)
            if Finv.shape[0] != m.weight[0].numel():  # stale (layer changed since calibration): no update
                continue
            # a consumer fed by several groups (concat) is updated again later: keep the inverse of
            # the surviving columns (OBS downdate) so the next update sees the current layer
            self._inverse[m] = obs_update(m.weight, Finv, list(idxs), _in_features(m))


def obs_update(weight: torch.Tensor, fisher_inverse: torch.Tensor, channels: list[int], in_features: int) -> torch.Tensor:
    """``W <- W - W_S [(F^-1)_SS]^-1 (F^-1)_S,:`` with ``S`` the columns of ``channels`` (in place).
    Returns the inverse Fisher of the surviving columns, ``(F^-1)_RR - (F^-1)_RS [(F^-1)_SS]^-1 (F^-1)_SR``."""
    W = weight.data.flatten(1)
    kk = W.shape[1] // in_features
    cols = (torch.tensor(channels, device=W.device).unsqueeze(1) * kk + torch.arange(kk, device=W.device)).flatten()
    Finv = fisher_inverse.to(W.device)
    solved = torch.linalg.solve(Finv[cols][:, cols], Finv[cols])                 # [(F^-1)_SS]^-1 (F^-1)_S,:
    weight.data.copy_((W.double() - W[:, cols].double() @ solved).to(W.dtype).view_as(weight))
    keep = torch.ones(Finv.shape[0], dtype=torch.bool, device=W.device)
    keep[cols] = False
    return (Finv - Finv[:, cols] @ solved)[keep][:, keep]


def _in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _diag_blocks(M: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k x k`` diagonal blocks of a square matrix, shape (n/k, k, k)."""
    n = M.shape[0] // k
    return M.view(n, k, n, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _mean_normalised(imps: list[torch.Tensor], roots: list) -> torch.Tensor:
    return tp_compat.mean_reduce_mean_normalize(imps, roots)


def _calibrate_curvature(importance: _CurvatureImportance, model, batches, device, loss=None) -> None:
    importance.calibrate(model, batches, device, loss)


# ---------------------------------------------------------------- the registry

IMPORTANCES.add("l1", Criterion(
    lambda **kw: tp.importance.GroupMagnitudeImportance(p=1),
    doc="group L1: mean over the group's layers of sum |w| of the channel (BN/LN gamma included)"))
IMPORTANCES.add("l2", Criterion(
    lambda **kw: tp.importance.GroupMagnitudeImportance(p=2),
    doc="group L2: mean over the group's layers of sum w^2 of the channel (BN/LN gamma included)"))
IMPORTANCES.add("bn_scale", Criterion(
    lambda **kw: tp.importance.BNScaleImportance(),
    doc="network slimming: |gamma| of the group's BatchNorm (groups without BN are not pruned)"))
IMPORTANCES.add("fpgm", Criterion(
    lambda **kw: FPGMImportance(),
    doc="geometric median: sum of distances of the channel's filter to the layer's other filters"))
IMPORTANCES.add("lamp", Criterion(
    lambda **kw: tp.importance.LAMPImportance(p=2),
    doc="LAMP: group L2 score / sum of the scores not smaller than it (within the group)"))
IMPORTANCES.add("random", Criterion(
    lambda **kw: tp.importance.RandomImportance(),
    doc="uniform random scores (the control); seeded by the stage seed"))
IMPORTANCES.add("taylor", Criterion(
    lambda **kw: TaylorImportance(), needs="grad",
    doc="first-order Taylor: sum over the group of |w * dL/dw|"))
IMPORTANCES.add("hessian", Criterion(
    lambda **kw: FisherOBDImportance(), needs="hessian",
    doc="OBD: sum of F_ii w_i^2 with F the per-sample (empirical Fisher) diagonal Hessian estimate"))
IMPORTANCES.add("kfac", Criterion(
    lambda **kw: KFACImportance(), calibrate=_calibrate_curvature,
    doc="KFAC-OBD (EigenDamage): 1/2 S_cc w_c^T A w_c (rows), 1/2 tr(W_c^T S W_c A_cc) (columns)"))
IMPORTANCES.add("obs", Criterion(
    lambda obs_dampening=0.01, obs_update=False, **kw: OBSImportance(obs_dampening, obs_update),
    calibrate=_calibrate_curvature,
    doc="OBS/WoodFisher: 1/2 sum_r W_rc [(F^-1)_cc]^-1 W_rc^T, dampened empirical Fisher; optional update"))
