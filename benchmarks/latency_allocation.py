"""Latency-budgeted allocation vs uniform and global ranking, with real accuracy and measured latency.

Part ``accuracy``: models trained here on real data (a Fashion-MNIST CNN; ResNet-20 and
MobileNetV2-for-CIFAR on CIFAR-10), each pruned to 0.5x and 0.33x dense latency (ONNX Runtime CPU,
1 thread, batch 1 and 32) by the ``search`` procedure (:func:`compress.search.procedure.run_search`),
which builds all four candidates in one run: ``uniform`` and ``global`` (Torch-Pruning's ranking; the
ratio bisected on the calibrated latency table), ``allocated`` (the latency allocator, measured end to
end and re-fit) and ``searched`` (Optuna TPE seeded from the allocator, uniform and global). Every
candidate is timed interleaved with the dense model in one run (medians) and gets the same distilled
fine-tune; test accuracy on the held-out test split.

Part ``efficiency``: torchvision ResNet-50 and MobileNetV2 at 224 (random weights), batch 1: global
(Torch-Pruning) and uniform at 2x MAC reduction, and the allocator at the latency global reaches;
measured speedup / MAC reduction for each (interleaved medians).

    python benchmarks/latency_allocation.py --data-root /work/shared/datasets [--part accuracy|efficiency]

Writes benchmarks/results/latency_allocation_<part>.json and prints markdown tables; the results
file benchmarks/results/latency_allocation.md quotes them with the conditions of the run.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FASHION_DIRS = ["fashion-mnist", "/usr/share/datasets/fashion-mnist"]


def atomic_write_json(path, data):
    from compress.io import atomic_write_json as write

    write(path, data)


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(root: Path, n_train: int, n_test: int) -> tuple:
    for d in FASHION_DIRS:
        p = root / d if not d.startswith("/") else Path(d)
        if (p / "train-images-idx3-ubyte.gz").exists():
            src = f"Fashion-MNIST ({p})"
            break
    else:
        p, src = root / "mnist", "MNIST (Fashion-MNIST not found)"

    def load(prefix):
        x = torch.tensor(_idx(p / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
        y = torch.tensor(_idx(p / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
        return (x - 0.2860) / 0.3530, y
    (xt, yt), (xs, ys) = load("train"), load("t10k")
    return _bundle(xt[:n_train], yt[:n_train], xs[:n_test], ys[:n_test]), src


def cifar10(root: Path, per_class_train: int, per_class_test: int) -> tuple:
    """A class-balanced subset of the CIFAR-10 JPEG image-folder tarball, decoded in memory."""
    from PIL import Image

    want = {"train": per_class_train, "test": per_class_test}
    got: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    full: set[tuple[str, str]] = set()
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 3 or parts[0] not in want:
                continue
            lst = got[parts[0]].setdefault(parts[1], [])
            if len(lst) < want[parts[0]]:
                lst.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
            elif len(lst) == want[parts[0]]:
                full.add((parts[0], parts[1]))
                if len(full) == 20:  # ten classes in both splits: the rest of the archive is not needed
                    break
    classes = sorted(got["train"])
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def tensors(split):
        xs, ys = [], []
        for ci, c in enumerate(classes):
            xs += got[split][c]
            ys += [ci] * len(got[split][c])
        x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float().div(255)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(ys), generator=g)
        return ((x - mean) / std)[perm], torch.tensor(ys)[perm]
    (xt, yt), (xs, ys) = tensors("train"), tensors("test")
    return _bundle(xt, yt, xs, ys), f"CIFAR-10 JPEG ({per_class_train}/class train, {per_class_test}/class test)"


def _bundle(xt, yt, xs, ys):
    """The benchmark's small, already-normalised tensors behind compress's Dataset interface."""
    from compress.data import DataBundle, TensorImages

    return DataBundle(TensorImages(xt, yt), TensorImages(xs, ys), 10)


def crop_flip(x: torch.Tensor, y):
    """CIFAR's standard training augmentation: a random 32x32 crop of the 4-pixel zero-padded image
    (zero = the normalised mean) and a horizontal flip, from torch's seeded global generator."""
    i, j = torch.randint(0, 9, (2,)).tolist()
    x = torch.nn.functional.pad(x, (4, 4, 4, 4))[:, i:i + x.shape[1], j:j + x.shape[2]]
    return (x.flip(2) if torch.rand(()) < 0.5 else x), y


def train_dense(model, data, epochs: int, lr: float, augment: bool, batch: int = 128) -> float:
    from compress.data import make_loader
    from compress.data.base import Augmented
    from compress.train.config import OptimizerConfig, TrainLoopConfig
    from compress.train.loop import train

    cfg = TrainLoopConfig(epochs=epochs, optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=0.9, weight_decay=5e-4))
    train_set = Augmented(data.train, crop_flip) if augment else data.train
    train(model, make_loader(train_set, batch, shuffle=True, seed=0, drop_last=True), cfg, "cpu",
          description="dense")
    return test_accuracy(model, data)


def test_accuracy(model, data) -> float:
    from compress.data import make_loader
    from compress.metrics import evaluate

    return evaluate(model.eval(), make_loader(data.test, 256, shuffle=False), "cpu")["accuracy"]


def trained(name: str, model, data, epochs: int, lr: float, augment: bool, key: str, cache_dir: Path) -> tuple:
    """Train ``model`` once per (model, data, epochs) and keep the weights under ``cache_dir``: a re-run
    of the benchmark loads them (weights_only) instead of training again."""
    import hashlib

    path = cache_dir / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return test_accuracy(model, data), 0.0, str(path)
    t0 = time.perf_counter()
    acc = train_dense(model, data, epochs, lr, augment)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return acc, time.perf_counter() - t0, str(path)


ACCURACY_MODELS = {
    # name: (factory, kwargs, dataset, default epochs, lr)
    "fashion_cnn": ("small_cnn", {"num_classes": 10, "in_channels": 1, "width": 32}, "fashion", 3, 0.05),
    "resnet20": ("resnet20", {"num_classes": 10}, "cifar10", 8, 0.1),
    "mobilenet_v2_cifar": ("mobilenet_v2", {"num_classes": 10, "width_mult": 0.5, "small_input": True}, "cifar10", 8,
                           0.05),
}


def _per_model(spec: str, name: str, default):
    """``name=value`` pairs, comma separated (``resnet20=10,mobilenet_v2_cifar=4``): this model's value."""
    for pair in filter(None, spec.split(",")):
        k, _, v = pair.rpartition("=")
        if k in ("", name):
            default = type(default)(v)
    return default


def part_accuracy(args) -> dict:
    from compress.search.config import SearchConfig
    from compress.search.procedure import SearchInputs, run_search
    from compress.zoo import MODELS

    root = Path(args.data_root)
    out_path = Path(args.out_dir) / "latency_allocation_accuracy.json"
    # models run in separate invocations (one at a time on a shared machine) land in one file
    out: dict = json.loads(out_path.read_text()) if out_path.exists() and not args.fresh else {"models": {}}
    out.setdefault("models", {})
    out.setdefault("conditions", {})
    cache: dict = {}
    for name in args.models.split(","):
        factory, kwargs, ds, epochs, lr = ACCURACY_MODELS[name]
        epochs = _per_model(args.epochs, name, epochs)
        if name == "fashion_cnn":
            kwargs, epochs = {**kwargs, "width": args.fashion_width}, args.fashion_epochs
        per_class = _per_model(args.cifar_per_class, name, 500)
        dkey = (ds, per_class)
        if dkey not in cache:
            t0 = time.perf_counter()
            cache[dkey] = (fashion(root, args.fashion_train, 2000) if ds == "fashion"
                           else cifar10(root, per_class, args.cifar_test_per_class))
            print(f"[data] {cache[dkey][1]}: {time.perf_counter() - t0:.0f} s", flush=True)
        data, src = cache[dkey]
        torch.manual_seed(0)
        model = MODELS.get(factory)(**kwargs)
        augment = ds == "cifar10"
        key = f"{factory}|{sorted(kwargs.items())}|{src}|{len(data.train)}|{epochs}|{lr}|{augment}"
        dense_acc, train_s, ckpt = trained(name, model, data, epochs, lr, augment, key, Path(args.checkpoints))
        print(f"[{name}] dense {dense_acc:.2f} % ({train_s:.0f} s training; {ckpt})", flush=True)
        entry = {"data": src, "train_samples": len(data.train), "test_samples": len(data.test),
                 "epochs": epochs, "augment": "random crop (pad 4) + flip" if augment else None,
                 "dense_test_accuracy": dense_acc, "train_seconds": train_s, "runs": [],
                 "load_start": os.getloadavg()}
        if args.train_only:
            continue
        shape = data.input_shape
        work = Path(tempfile.mkdtemp(prefix=f"latalloc-{name}-"))
        for batch, budget in [tuple(float(v) for v in pair.split("@")) for pair in args.settings.split(",")]:
            batch = int(batch)
            if True:
                cfg = SearchConfig(
                    budget=budget, budget_metric="latency", trials=args.trials, top_k=1, batch_size=batch,
                    threads=1, max_ratio=0.9, grid=[0.25, 0.5, 0.75, 1.0], latency_tolerance=0.05,
                    proxy={"bn_batches": 5, "val_size": 500},
                    measure={"warmup": 3, "iters": args.iters, "rounds": 6}, importance=args.importance,
                    allocator_cost=args.allocator_cost, allocator_refit_groups=args.refit_groups,
                    finetune={"epochs": 1, "max_steps": args.finetune_steps, "batch_size": 64,
                              "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
                              "distill": {"alpha": 0.7, "temperature": 4.0}})
                sdir = work / f"b{batch}-{budget}"
                sdir.mkdir(parents=True)
                t0 = time.perf_counter()
                res = run_search(cfg, SearchInputs(
                    model=model, teacher=model, data=data, input_shape=shape, batch_size=64, seed=0, run_dir=work,
                    stage_dir=sdir, run_name=f"{name}-b{batch}-{budget}", device="cpu",
                    calibration=calibration_batches(data, args.calibration_batches)))
                r = res.result
                rows = [{k: row.get(k) for k in ("name", "macs", "params", "predicted_ms", "measured_ms",
                                                 "test_accuracy", "val_accuracy", "widths", "group_ratios", "ratio",
                                                 "group_refit", "allocator_attempts")}
                        for row in r["rows"]]
                entry["runs"].append({"batch_size": batch, "budget": budget, "chosen": r["chosen"],
                                      "within_budget": r["within_budget"], "seconds": time.perf_counter() - t0,
                                      "rows": rows})
                print(f"[{name}] batch {batch} budget {budget}: " + ", ".join(
                    f"{x['name']} {x['measured_ms'] / rows[0]['measured_ms']:.3f}x {x.get('test_accuracy') or 0:.2f}%"
                    for x in rows), flush=True)
                atomic_write_json(out_path, {**out, "models": {**out["models"], name: entry}})
        entry["load_end"] = os.getloadavg()
        entry["conditions"] = {"settings": args.settings, "trials": args.trials, "finetune_steps": args.finetune_steps,
                               "importance": args.importance, "allocator_cost": args.allocator_cost,
                               "allocator_refit_groups": args.refit_groups,
                               "calibration_batches": args.calibration_batches,
                               "finetune_batch": 64, "measure_iters": args.iters, "threads": 1,
                               "backend": "onnxruntime (CPU)", "command": " ".join(sys.argv)}
        out["models"][name] = entry
    return out


def _load_trained(args, name: str):
    """The dense model ``name`` trained (or loaded from the cache) exactly as ``--part accuracy`` does."""
    from compress.zoo import MODELS

    factory, kwargs, ds, epochs, lr = ACCURACY_MODELS[name]
    epochs = _per_model(args.epochs, name, epochs)
    if name == "fashion_cnn":
        kwargs, epochs = {**kwargs, "width": args.fashion_width}, args.fashion_epochs
    per_class = _per_model(args.cifar_per_class, name, 500)
    data, src = (fashion(Path(args.data_root), args.fashion_train, 2000) if ds == "fashion"
                 else cifar10(Path(args.data_root), per_class, args.cifar_test_per_class))
    torch.manual_seed(0)
    model = MODELS.get(factory)(**kwargs)
    augment = ds == "cifar10"
    key = f"{factory}|{sorted(kwargs.items())}|{src}|{len(data.train)}|{epochs}|{lr}|{augment}"
    dense_acc, train_s, ckpt = trained(name, model, data, epochs, lr, augment, key, Path(args.checkpoints))
    return model.eval(), data, src, dense_acc, train_s, ckpt, epochs


def calibration_batches(data, n: int, batch: int = 64, seed: int = 7) -> list:
    """``n`` fixed, un-augmented training batches (the prune stage's ``calibration_batches``)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[: n * batch].tolist()
    items = [data.train[i] for i in idx]
    return [(torch.stack([x for x, _ in items[k:k + batch]]), torch.tensor([int(y) for _, y in items[k:k + batch]]))
            for k in range(0, len(items), batch)]


def part_costs(args) -> dict:
    """The allocator's accuracy cost compared before any fine-tune: per cost, allocate for 0.5x and 0.33x of
    the dense model's *predicted* latency (batch 1 table), prune, re-estimate BatchNorm on training batches,
    and report held-out test accuracy; uniform and global (Torch-Pruning's L2 ranking) bisected on the same
    table for reference."""
    from compress.structured import pruner
    from compress.structured.criteria import IMPORTANCES, calibrate as calibrate_criterion
    from compress.search.allocator import allocate, channel_groups, layer_latency, ratios_for
    from compress.search.candidates import Pruner, bisect_ratio, evaluate_on, recalibrate_batchnorm
    from compress.search.latency_target import per_layer_block
    from compress.search.latency_table import LatencyPredictor, LatencyTable
    from compress.search.sensitivity import calibration_loss, measured_groups

    name = args.models.split(",")[0]
    model, data, src, dense_acc, _, _, _ = _load_trained(args, name)
    shape = data.input_shape
    ex = torch.randn(1, *shape)
    calib = calibration_batches(data, args.calibration_batches)
    bn_batches = calibration_batches(data, 10, seed=11)
    guards = pruner.Guards()
    first, output = pruner.io_layers(model, ex)
    ref = pruner.channel_counts(model, ex)
    work = Path(tempfile.mkdtemp(prefix="latalloc-costs-"))
    out = {"model": name, "data": src, "dense_test_accuracy": dense_acc, "load_start": os.getloadavg(), "rows": [],
           "calibration": f"{args.calibration_batches} x 64 training images", "bn": "10 x 64 training images"}

    def bn_test_acc(m) -> float:
        m = copy.deepcopy(m)
        recalibrate_batchnorm(m, bn_batches, 10, "cpu")
        return evaluate_on(m, data.test, "cpu")["accuracy"]

    def groups_for(criterion: str):
        crit = IMPORTANCES.get(criterion)
        imp = crit.build()
        calibrate_criterion(crit, imp, model, calib if (crit.needs or crit.calibrate) else [], "cpu")
        gs = channel_groups(model, ex, imp, [output], round_to=guards.round_to, min_floor=guards.floor,
                            first_conv=first, first_conv_max_ratio=guards.first_conv_max_ratio, max_ratio=0.9)
        model.zero_grad(set_to_none=True)

        def apply(widths):
            m = copy.deepcopy(model)
            block = per_layer_block(m, gs, ratios_for(gs, widths))
            if not block:
                return m
            imp2 = crit.build()
            gp = pruner.GuardedPruner(m, ex, imp2, ratio=0.0, per_layer=block, scope="per_layer", guards=guards,
                                      max_ratio=1.0, reference=ref)
            calibrate_criterion(crit, imp2, m, calib if (crit.needs or crit.calibrate) else [], "cpu")
            gp.step()
            m.zero_grad(set_to_none=True)
            return m.eval()
        return gs, apply

    table = LatencyTable(work / "table.json", "onnxruntime", 1, 1)
    l2_groups, _ = groups_for("l2")
    predictor = LatencyPredictor(model, shape, table, {m for g in l2_groups for m in g.members}, (0.25, 0.5, 0.75, 1.0),
                                 guards.round_to, 8)
    t0 = time.perf_counter()
    predictor.warm(model)
    print(f"[costs] latency table: {len(table.layers)} entries ({time.perf_counter() - t0:.0f} s)", flush=True)
    dense_pred = predictor.layers_ms(model)
    base = Pruner(model, shape, "l2", 8, None, 0.9)
    for budget in args.cost_budgets:
        for scope in ("uniform", "global"):
            r, _ = bisect_ratio(lambda r: predictor.layers_ms(base.prune(scope, r)) / dense_pred, budget, 0.9)
            m = base.prune(scope, r)
            out["rows"].append({"cost": f"{scope} (l2)", "budget": budget, "predicted": predictor.layers_ms(m) / dense_pred,
                                "bn_test_accuracy": bn_test_acc(m), "ratio": r, "widths": base.widths(m)})
            print(f"[costs] {out['rows'][-1]}", flush=True)
    variants = [("importance l2", "l2", False), ("importance taylor", "taylor", False),
                ("sensitivity (l2 order)", "l2", True), ("sensitivity (taylor order)", "taylor", True)]
    for label, criterion, sensitive in variants:
        t0 = time.perf_counter()
        gs, apply = groups_for(criterion)
        report = None
        if sensitive:
            gs, report = measured_groups(gs, apply, lambda m: calibration_loss(m, calib, "cpu"), args.sensitivity_points)
        setup_s = time.perf_counter() - t0
        lat = layer_latency(gs, predictor)
        for budget in args.cost_budgets:
            a = allocate(gs, lat, budget * dense_pred)
            m = apply(a.widths)
            out["rows"].append({"cost": label, "budget": budget, "predicted": a.predicted_ms / dense_pred,
                                "bn_test_accuracy": bn_test_acc(m), "widths": a.widths, "setup_seconds": setup_s,
                                **({"sensitivity": report} if report and budget == args.cost_budgets[0] else {})})
            print(f"[costs] {label} {budget}: predicted {a.predicted_ms / dense_pred:.3f}, "
                  f"{out['rows'][-1]['bn_test_accuracy']:.2f} %, widths {a.widths} ({setup_s:.0f} s setup)", flush=True)
    out["load_end"] = os.getloadavg()
    atomic_write_json(Path(args.out_dir) / "latency_allocation_costs.json", out)
    return out


def part_refit(args) -> dict:
    """Does the per-group re-fit of the latency table change the allocator's choice? For each batch size:
    allocate for 0.5x and 0.33x of the table's dense latency with the plain table and with the per-group
    corrected one (cost: the L2 importance), and time dense and every allocation in one interleaved run."""
    from compress.structured import pruner
    from compress.structured.criteria import IMPORTANCES
    from compress.search.allocator import allocate, channel_groups, corrected, group_factors, layer_latency, ratios_for
    from compress.search.candidates import measure_models
    from compress.search.latency_target import per_layer_block
    from compress.search.latency_table import LatencyPredictor, LatencyTable

    name = args.models.split(",")[0]
    model, data, src, *_ = _load_trained(args, name)
    shape = data.input_shape
    ex = torch.randn(1, *shape)
    guards = pruner.Guards()
    first, output = pruner.io_layers(model, ex)
    ref = pruner.channel_counts(model, ex)
    imp = IMPORTANCES.get("l2").build()
    gs = channel_groups(model, ex, imp, [output], round_to=8, min_floor=guards.floor, first_conv=first,
                        first_conv_max_ratio=guards.first_conv_max_ratio, max_ratio=0.9)
    work = Path(tempfile.mkdtemp(prefix="latalloc-refit-"))

    def apply(widths):
        m = copy.deepcopy(model)
        block = per_layer_block(m, gs, ratios_for(gs, widths))
        if block:
            pruner.GuardedPruner(m, ex, IMPORTANCES.get("l2").build(), ratio=0.0, per_layer=block, scope="per_layer",
                                 guards=guards, max_ratio=1.0, reference=ref).step()
        return m.eval()

    out = {"model": name, "data": src, "load_start": os.getloadavg(), "runs": []}
    for batch in args.refit_batches:
        table = LatencyTable(work / "table.json", "onnxruntime", batch, 1)
        predictor = LatencyPredictor(model, shape, table, {m for g in gs for m in g.members}, (0.25, 0.5, 0.75, 1.0),
                                     8, 8)
        predictor.warm(model)
        lat = layer_latency(gs, predictor)

        def measure_many(models, batch=batch):
            t = measure_models({"dense": model, **models}, shape, work / f"b{batch}", "onnxruntime", batch, 1, 3,
                               args.iters, 6)
            return {k: v["p50"] for k, v in t.items()}
        t0 = time.perf_counter()
        factors, report = group_factors(gs, lat, apply, measure_many)
        refit_s = time.perf_counter() - t0
        fixed = corrected(lat, factors)
        dense_pred = lat.total([g.dense for g in gs])
        allocs = {}
        for budget in args.cost_budgets:
            allocs[f"table@{budget}"] = allocate(gs, lat, budget * dense_pred)
            allocs[f"refit@{budget}"] = allocate(gs, fixed, budget * dense_pred)
        ms = measure_many({k: apply(a.widths) for k, a in allocs.items()})
        run = {"batch_size": batch, "group_refit": report, "refit_seconds": refit_s, "dense_ms": ms["dense"],
               "allocations": {k: {"widths": a.widths, "predicted_ratio": a.predicted_ms / dense_pred,
                                   "measured_ratio": ms[k] / ms["dense"]} for k, a in allocs.items()}}
        out["runs"].append(run)
        print(f"[refit] batch {batch}: factors " + ", ".join(f"{k} {v['factor']:.2f}" for k, v in report['groups'].items()) + f" (level {report['level']})",
              flush=True)
        for k, v in run["allocations"].items():
            print(f"[refit] batch {batch} {k}: predicted {v['predicted_ratio']:.3f}, measured {v['measured_ratio']:.3f}"
                  f", widths {v['widths']}", flush=True)
    out["load_end"] = os.getloadavg()
    atomic_write_json(Path(args.out_dir) / "latency_allocation_refit.json", out)
    return out


def part_efficiency(args) -> dict:
    import torchvision

    from compress.metrics import count_macs
    from compress.search.candidates import measure_models
    from compress.search.latency_target import LatencySetup, fit_latency
    from compress.structured import pruner
    from compress.structured.criteria import IMPORTANCES

    out: dict = {"models": {}}
    crit = IMPORTANCES.get("l2")
    for name in args.large.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        shape = (3, 224, 224)
        ex = torch.randn(1, *shape)
        dense_macs = count_macs(model, shape)
        work = Path(tempfile.mkdtemp(prefix=f"latalloc-{name}-"))
        guards = pruner.Guards()
        ref = pruner.channel_counts(model, ex)
        kw = {"ignore": None, "guards": guards, "max_ratio": 0.9, "reference": ref}
        models = {}
        t0 = time.perf_counter()
        for scope in ("global", "uniform"):
            r, _ = pruner.ratio_for_target(model, ex, crit.build, lambda m: count_macs(m, shape) / dense_macs, 0.5,
                                           hi=0.9, iters=7, scope=scope, **kw)
            m = copy.deepcopy(model)
            pruner.GuardedPruner(m, ex, crit.build(), ratio=r, scope=scope, **kw).step()
            models[scope] = m.eval()
        print(f"[{name}] baselines at 2x MACs ({time.perf_counter() - t0:.0f} s)", flush=True)
        t = measure_models({"dense": model, "global": models["global"]}, shape, work / "g", "onnxruntime", 1, 1,
                           3, args.large_iters, 6)
        global_ratio = t["global"]["p50"] / t["dense"]["p50"]
        t0 = time.perf_counter()
        setup = LatencySetup(batch_size=1, threads=1, tolerance=0.03, refits=3, grid_points=4,
                             grid=(0.25, 0.5, 1.0) if "resnet" in name else (0.25, 0.5, 0.75, 1.0),
                             iters=args.large_iters, rounds=6)
        fit = fit_latency(model, shape, ex, crit.build, lambda m, imp: None, budget=global_ratio, setup=setup,
                          guards=guards, ignore=None, max_ratio=0.9, table_path=work / "table.json",
                          work_dir=work / "alloc", reference=ref, log=lambda s: print(f"[{name}] {s}", flush=True))
        models["allocated"] = fit.result.model
        print(f"[{name}] allocator ({time.perf_counter() - t0:.0f} s incl. the latency table)", flush=True)
        timing = measure_models({"dense": model, **models}, shape, work / "final", "onnxruntime", 1, 1, 3,
                                args.large_iters * 2, 10)
        rows = []
        for k, m in models.items():
            macs = count_macs(m, shape)
            speed = timing["dense"]["p50"] / timing[k]["p50"]
            rows.append({"name": k, "macs": macs, "mac_reduction": dense_macs / macs, "ms": timing[k]["p50"],
                         "speedup": speed, "efficiency": speed / (dense_macs / macs)})
        out["models"][name] = {"dense_ms": timing["dense"]["p50"], "dense_macs": dense_macs, "rows": rows,
                               "allocator": fit.summary(), "global_measured_ratio_first": global_ratio}
        for row in rows:
            print(f"[{name}] {row['name']}: {row['mac_reduction']:.2f}x MACs, {row['speedup']:.2f}x speed, "
                  f"efficiency {row['efficiency']:.2f}", flush=True)
        atomic_write_json(Path(args.out_dir) / "latency_allocation_efficiency.json", out)
    return out


def goal_verdict(run: dict) -> dict:
    """The issue's goal for one (model, setting): against the better of uniform and global (the more
    accurate one; the faster on a tie), the best of ``allocated`` and ``searched-*`` either (a) at equal or
    better test accuracy, >= 25 % lower measured latency, or (b) at equal measured latency (within 5 %),
    >= 1 point higher test accuracy."""
    rows = {r["name"]: r for r in run["rows"]}
    base = max((rows[k] for k in ("uniform", "global") if k in rows),
               key=lambda r: (r.get("test_accuracy") or 0, -r["measured_ms"]))
    out = {"baseline": base["name"], "baseline_ms": base["measured_ms"], "baseline_acc": base.get("test_accuracy"),
           "baseline_ratio": base["measured_ms"] / run["rows"][0]["measured_ms"]}
    best = None
    limit = run["budget"] * 1.05 * run["rows"][0]["measured_ms"]
    for r in run["rows"]:
        if not (r["name"] == "allocated" or r["name"].startswith("searched")) or r["measured_ms"] > limit:
            continue  # over the budget as measured: not a candidate the search may return
        speed = 1 - r["measured_ms"] / base["measured_ms"]
        gain = (r.get("test_accuracy") or 0) - (base.get("test_accuracy") or 0)
        met = (gain >= 0 and speed >= 0.25) or (r["measured_ms"] <= 1.05 * base["measured_ms"] and gain >= 1.0)
        cand = {"name": r["name"], "latency_saving": speed, "accuracy_gain": gain, "met": met}
        if best is None or (met, gain) > (best["met"], best["accuracy_gain"]):
            best = cand
    out["best"] = best
    return out


def render(results_dir: Path) -> str:
    """Markdown tables from the two JSON files (whichever exist)."""
    lines = []
    acc = results_dir / "latency_allocation_accuracy.json"
    if acc.exists():
        data = json.loads(acc.read_text())
        lines += ["| model | batch | budget | better baseline (x dense, acc %) | best of allocated/searched (x dense, acc %) | "
                  "latency vs baseline | accuracy vs baseline | goal met? |", "|---|---:|---:|---|---|---:|---:|---|"]
        for name, e in data["models"].items():
            for run in e["runs"]:
                v = goal_verdict(run)
                b = v["best"] or {"name": "none within budget", "latency_saving": float("nan"),
                                  "accuracy_gain": float("nan"), "met": False}
                rows = {r["name"]: r for r in run["rows"]}
                best = (f"{b['name']} ({rows[b['name']]['measured_ms'] / run['rows'][0]['measured_ms']:.3f}, "
                        f"{rows[b['name']].get('test_accuracy') or 0:.2f})" if b["name"] in rows else b["name"])
                lines.append(f"| {name} | {run['batch_size']} | {run['budget']} | {v['baseline']} "
                             f"({v['baseline_ratio']:.3f}, {v['baseline_acc']:.2f}) | {best} | "
                             f"{-100 * b['latency_saving']:+.1f} % | {b['accuracy_gain']:+.2f} pt | "
                             f"{'yes' if b['met'] else 'no'} |")
        lines.append("")
        for name, e in data["models"].items():
            lines += [f"#### {name}: {e['data']}, {e['train_samples']} train / {e['test_samples']} test, "
                      f"{e['epochs']} epochs; dense test accuracy {e['dense_test_accuracy']:.2f} %", ""]
            for run in e["runs"]:
                d = run["rows"][0]
                lines += [f"batch {run['batch_size']}, budget {run['budget']} x dense (dense {d['measured_ms']:.3f} ms "
                          f"measured with the candidates); chosen by the search: {run['chosen']} "
                          f"({'within' if run['within_budget'] else 'OVER'} budget)", "",
                          "| candidate | measured ms (p50) | x dense | MACs | test acc % | widths / ratio |",
                          "|---|---:|---:|---:|---:|---|"]
                for r in run["rows"][1:]:
                    widths = r.get("widths") or (f"ratio {r['ratio']:.3f}" if r.get("ratio") is not None
                                                 else ", ".join(f"{x:.2f}" for x in r.get("group_ratios") or []))
                    if isinstance(widths, dict):
                        widths = " ".join(str(v) for v in widths.values())
                    lines.append(f"| {r['name']} | {r['measured_ms']:.3f} | {r['measured_ms'] / d['measured_ms']:.3f} | "
                                 f"{r['macs']:,} | {r.get('test_accuracy') or 0:.2f} | {widths} |")
                lines.append("")
    costs = results_dir / "latency_allocation_costs.json"
    if costs.exists():
        data = json.loads(costs.read_text())
        lines += [f"Allocator costs on {data['model']} ({data['data']}; dense {data['dense_test_accuracy']:.2f} %), "
                  "no fine-tune, BatchNorm re-estimated, held-out test accuracy:", "",
                  "| cost | budget (x dense, table) | predicted | BN-re-estimated test acc % | widths |",
                  "|---|---:|---:|---:|---|"]
        for r in data["rows"]:
            lines.append(f"| {r['cost']} | {r['budget']} | {r['predicted']:.3f} | {r['bn_test_accuracy']:.2f} | "
                         f"{' '.join(str(w) for w in r['widths'])} |")
        lines.append("")
    refit = results_dir / "latency_allocation_refit.json"
    if refit.exists():
        data = json.loads(refit.read_text())
        lines += [f"Per-group re-fit on {data['model']} (L2 cost):", "",
                  "| batch | allocation | predicted | measured (x dense, interleaved) | widths |", "|---:|---|---:|---:|---|"]
        for run in data["runs"]:
            for k, a in run["allocations"].items():
                lines.append(f"| {run['batch_size']} | {k} | {a['predicted_ratio']:.3f} | {a['measured_ratio']:.3f} | "
                             f"{' '.join(str(w) for w in a['widths'])} |")
        lines.append("")
    eff = results_dir / "latency_allocation_efficiency.json"
    if eff.exists():
        data = json.loads(eff.read_text())
        lines += ["| model | candidate | MAC reduction | measured ms (p50) | speedup | speedup / MAC reduction |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, e in data["models"].items():
            lines.append(f"| {name} | dense | 1.00x | {e['dense_ms']:.1f} | 1.00x | - |")
            for r in e["rows"]:
                lines.append(f"| {name} | {r['name']} | {r['mac_reduction']:.2f}x | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                             f"{r['efficiency']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default="/work/shared/datasets")
    ap.add_argument("--part", choices=["accuracy", "costs", "refit", "efficiency", "render"], required=True)
    ap.add_argument("--models", default="fashion_cnn,resnet20,mobilenet_v2_cifar")
    ap.add_argument("--large", default="resnet50,mobilenet_v2")
    ap.add_argument("--fashion-train", type=int, default=12000)
    ap.add_argument("--cifar-per-class", default="500", help="training images per class: N, or model=N pairs")
    ap.add_argument("--cifar-test-per-class", type=int, default=200)
    ap.add_argument("--epochs", default="", help="dense training epochs per CIFAR model: model=N pairs")
    ap.add_argument("--checkpoints", default="/tmp/latalloc-checkpoints", help="trained dense weights, reused")
    ap.add_argument("--train-only", action="store_true", help="train (or load) the dense models and stop")
    ap.add_argument("--fresh", action="store_true", help="start a new accuracy JSON instead of adding to it")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--settings", default="1@0.5,1@0.33,32@0.5,32@0.33", help="batch@budget pairs")
    ap.add_argument("--fashion-width", type=int, default=32)
    ap.add_argument("--fashion-epochs", type=int, default=3)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--large-iters", type=int, default=30)
    ap.add_argument("--calibration-batches", type=int, default=8, help="batches of 64 for taylor and sensitivity")
    ap.add_argument("--importance", default="l2", help="the search's criterion (baselines and allocator)")
    ap.add_argument("--allocator-cost", default="importance", choices=["importance", "sensitivity"])
    ap.add_argument("--refit-groups", action="store_true", help="per-group re-fit of the allocator's table")
    ap.add_argument("--sensitivity-points", type=int, default=3)
    ap.add_argument("--refit-batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 32])
    ap.add_argument("--cost-budgets", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.33])
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.part == "render":
        print(render(Path(args.out_dir)))
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = {"accuracy": part_accuracy, "costs": part_costs, "refit": part_refit,
           "efficiency": part_efficiency}[args.part](args)
    from benchmarks.common import machine

    res.update({"machine": machine(), "command": " ".join(sys.argv), "seconds": time.perf_counter() - t0})
    atomic_write_json(Path(args.out_dir) / f"latency_allocation_{args.part}.json", res)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
