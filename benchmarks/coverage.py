"""Architecture coverage: which torchvision / timm / Hugging Face models compress prunes, exports and
matches in ONNX Runtime, next to raw Torch-Pruning written the way its own benchmark scripts are.

    python benchmarks/coverage.py                       # every model, both arms
    python benchmarks/coverage.py --arms compress --reuse benchmarks/results/coverage.json
    python benchmarks/coverage.py --only resnet18 vit_b_16

Each model runs in its own subprocess with a timeout (``--timeout``, seconds); ``--jobs`` runs
several side by side, ``--resume`` keeps the rows of an interrupted sweep.
Both arms prune 50 % of channels with global L2 (group) magnitude on random-init weights (nothing
is downloaded) and check parity on the same 4 random inputs:

- ``compress``: the real ``prune`` stage with its defaults (global l2, ratio 0.5, guards) and the
  real ``export`` stage with its defaults (exporter choice, parity, 2:4 read-back).
- ``torch_pruning``: ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` (the
  ``GroupNormImportance`` of older releases), ``global_pruning=True``, ``pruning_ratio=0.5``,
  ``ignored_layers`` = the final classifier (layers whose output is the class count),
  ``round_to=None``, one step; torchvision ViT's ``hidden_dim`` patched by hand and HF attention
  heads declared / patched by hand as Torch-Pruning's own scripts do; exported with
  ``torch.onnx.export`` (TorchScript exporter, opset 17, as the issue's sweep did).

Success = the pruned model runs, params <= 0.8x dense, and ONNX Runtime max |error| < 1e-3, the
error taken relative to the largest logit when that exceeds 1 (random-init nets whose BN statistics
do not fit their weights reach logits of 1e9, where fp32 itself cannot hold 1e-3; both arms alike).
Input size: the smallest of 64/96/128/160/224 at which the dense model builds and runs (timm models
are asked for ``img_size`` where they take it), else the model's default.
Writes benchmarks/results/coverage.md and coverage.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, machine_lines, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARITY_TOL = 1e-3
PARAMS_MAX = 0.8
SIZES = (64, 96, 128, 160, 224)
EXPORTER = "auto"  # the export stage's onnx.exporter in the compress arm (--exporter)

TORCHVISION = [
    "alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "squeezenet1_1", "densenet121",
    "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_b_16",
    "swin_t", "swin_v2_t", "maxvit_t",
]
TIMM = [
    "resnet10t", "resnest14d", "res2net50_14w_8s", "dpn48b", "cspresnet50", "darknet17", "dla34",
    "hrnet_w18_small", "ghostnet_100", "mixnet_s", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "mobilevit_xxs", "efficientformer_l1", "efficientformerv2_s0",
    "levit_128s", "mixer_s32_224", "gmlp_ti16_224", "deit_tiny_patch16_224",
    "pit_ti_224", "poolformer_s12", "convnextv2_atto",
    "edgenext_xx_small", "fastvit_t8", "mobileone_s0", "repvgg_a0", "regnetx_002", "rexnet_100",
    "skresnet18", "ese_vovnet19b_dw", "lcnet_050",
    "visformer_tiny", "xcit_nano_12_p16_224", "pvt_v2_b0", "coatnet_nano_rw_224",
    "efficientvit_b0", "tiny_vit_5m_224", "repvit_m1", "starnet_s1",
    "mambaout_femto",
]
HF = ["hf_vit", "hf_deit", "hf_swin", "hf_convnext", "hf_resnet", "hf_mobilevit", "hf_segformer", "hf_bert"]


# ---------------------------------------------------------------------------------------------
# model builders (random init)

def hf_model(name: str):
    """Small-config Hugging Face models (random init): ``(model, input_shape, input_dtype)``."""
    import transformers as tf

    img = dict(image_size=64, num_channels=3, num_labels=10)
    if name == "hf_vit":
        return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                                         intermediate_size=256, patch_size=16, **img)), (3, 64, 64)
    if name == "hf_deit":
        return tf.DeiTForImageClassification(tf.DeiTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                                           intermediate_size=256, patch_size=16, **img)), (3, 64, 64)
    if name == "hf_swin":
        return tf.SwinForImageClassification(tf.SwinConfig(embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4,
                                                           patch_size=4, **img)), (3, 64, 64)
    if name == "hf_convnext":
        return tf.ConvNextForImageClassification(tf.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                                                                   num_labels=10)), (3, 64, 64)
    if name == "hf_resnet":
        return tf.ResNetForImageClassification(tf.ResNetConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                                               embedding_size=32, num_labels=10)), (3, 64, 64)
    if name == "hf_mobilevit":
        return tf.MobileViTForImageClassification(tf.MobileViTConfig(image_size=64, num_labels=10)), (3, 64, 64)
    if name == "hf_segformer":
        return tf.SegformerForImageClassification(tf.SegformerConfig(num_labels=10, hidden_sizes=[32, 64, 128, 256],
                                                                     depths=[1, 1, 1, 1])), (3, 64, 64)
    if name == "hf_bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=256,
                                                              num_labels=2)), (32,)
    raise KeyError(name)


def build(source: str, name: str, size: int | None):
    if source == "torchvision":
        import torchvision

        kw = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
        return getattr(torchvision.models, name)(weights=None, **kw)
    if source == "timm":
        import timm

        if size is not None:
            try:
                return timm.create_model(name, pretrained=False, img_size=size)
            except TypeError:
                pass
        return timm.create_model(name, pretrained=False)
    return hf_model(name)[0]


def pick_size(source: str, name: str):
    """The smallest size in SIZES at which the dense model builds and runs; ``(model, shape)``."""
    import torch

    if source == "hf":
        return hf_model(name)
    last = None
    for s in SIZES:
        try:
            m = build(source, name, s).eval()
            with torch.no_grad():
                m(torch.randn(1, 3, s, s))
            return m, (3, s, s)
        except Exception as exc:  # a model that needs a larger input: try the next size
            last = exc
    m = build(source, name, None).eval()
    cfg = getattr(m, "default_cfg", None) or getattr(m, "pretrained_cfg", None) or {}
    shape = tuple(cfg.get("input_size", (3, 224, 224)))
    with torch.no_grad():
        try:
            m(torch.randn(1, *shape))
        except Exception:
            raise RuntimeError(f"dense model does not run at any of {SIZES} or {shape}: {last}") from None
    return m, shape


def inputs_for(model, shape, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if len(shape) == 1:  # token ids
        vocab = model.config.vocab_size
        return torch.randint(0, vocab, (n, *shape), generator=g)
    return torch.randn(n, *shape, generator=g)


# ---------------------------------------------------------------------------------------------
# the two arms (each runs in a worker subprocess)

def arm_compress(model, shape, workdir: Path) -> dict:
    import torch

    from compress.config import ModelConfig
    from torch.utils.data import TensorDataset

    from compress.data.base import DataBundle
    from compress.stages import STAGES, StageContext

    x = inputs_for(model, shape, 4)
    y = torch.zeros(len(x), dtype=torch.long)
    data = DataBundle(TensorDataset(x, y), TensorDataset(x, y), num_classes=10)
    ctx = StageContext(run_dir=workdir, device=torch.device("cpu"), data=data, model=model, run_name="coverage",
                       run_seed=0, model_spec=ModelConfig(factory="coverage:model", input_shape=list(shape)),
                       batch_size=4, dense=None, index=0, stage_dir=workdir)
    timings = {}
    prune = STAGES.get("prune")
    t0 = time.perf_counter()
    out = prune.run(prune.config(kind="prune"), ctx)
    timings["prune_s"] = time.perf_counter() - t0
    pm = out.metrics
    export = STAGES.get("export")
    t0 = time.perf_counter()
    eo = export.run(export.config(kind="export", onnx={"exporter": os.environ.get("COVERAGE_EXPORTER", "auto")}), ctx)
    timings["export_s"] = time.perf_counter() - t0
    ex = eo.summary["export"]
    res = {"params_before": pm["params_before"], "params_after": pm["params_after"],
           "parity": ex["parity_max_abs_error"], "logit_scale": ex.get("parity_logit_scale"),
           "exporter": ex.get("exporter"), "opset": ex.get("opset"),
           **timings}
    if "timing_s" in pm:  # the prune stage's per-phase breakdown
        res["prune_phases_s"] = pm["timing_s"]
    if pm.get("patched_attributes"):
        res["patched_attributes"] = pm["patched_attributes"]
    if pm.get("unpruned_groups"):
        res["unpruned_groups"] = len(pm["unpruned_groups"])
        res["unpruned_example"] = str(pm["unpruned_groups"][0])[:200]
    if "export_fallback" in ex:
        res["export_fallback"] = ex["export_fallback"]
    return res


def _classifiers(model, num_classes: int):
    from torch import nn

    return [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == num_classes)
            or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]


def _qkv(m):
    from torch import nn

    for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")):
        mods = [getattr(m, n, None) for n in names]
        if all(isinstance(x, nn.Linear) for x in mods):
            return mods
    return None


def arm_torch_pruning(model, shape, workdir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    import torch_pruning as tp

    from compress.metrics import logits_of

    model.eval()
    example = inputs_for(model, shape, 1)
    with torch.no_grad():
        num_classes = logits_of(model(example)).shape[-1]
    before = tp.utils.count_params(model)
    num_heads, hf_attn = {}, []
    for m in model.modules():  # Torch-Pruning's HF examples declare q/k/v heads and patch them after
        qkv = _qkv(m)
        heads = getattr(m, "num_attention_heads", getattr(m, "num_heads", None))
        if qkv and isinstance(heads, int):
            for lin in qkv:
                num_heads[lin] = heads
            hf_attn.append((m, qkv))
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, global_pruning=True, iterative_steps=1, round_to=None,
                                  ignored_layers=_classifiers(model, num_classes), num_heads=num_heads,
                                  output_transform=logits_of,
                                  **({"prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": 0.5}
                                     if num_heads else {}))
    t0 = time.perf_counter()
    pruner.step()
    prune_s = time.perf_counter() - t0
    try:
        from torchvision.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):  # as Torch-Pruning's torchvision script does
            model.hidden_dim = model.conv_proj.out_channels
    except ImportError:
        pass
    for m, qkv in hf_attn:
        heads = pruner.num_heads[qkv[0]]
        for attr in ("num_attention_heads", "num_heads"):
            if hasattr(m, attr):
                setattr(m, attr, heads)
        for attr in ("attention_head_size", "head_dim"):
            if hasattr(m, attr):
                setattr(m, attr, qkv[0].out_features // heads)
        if hasattr(m, "all_head_size"):
            m.all_head_size = qkv[0].out_features
    after = tp.utils.count_params(model)
    x = inputs_for(model, shape, 4)
    with torch.no_grad():
        ref = logits_of(model(x)).numpy()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return logits_of(self.inner(t))

    path = workdir / "tp.onnx"
    t0 = time.perf_counter()
    torch.onnx.export(Logits(model).eval(), (x[:1],), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    export_s = time.perf_counter() - t0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return {"params_before": before, "params_after": after, "parity": float(np.abs(ref - got).max()),
            "logit_scale": float(np.abs(ref).max()),
            "prune_s": prune_s, "export_s": export_s}


def worker(source: str, name: str, arm: str) -> dict:
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, shape = pick_size(source, name)
    res = {"model": name, "source": source, "arm": arm, "input_shape": list(shape)}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fn = arm_compress if arm == "compress" else arm_torch_pruning
            res.update(fn(model, shape, Path(tmp)))
        except BaseException as exc:  # the reason is the result: every miss is reported
            last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            where = f" [{Path(last.filename).name}:{last.lineno}]" if last else ""
            res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}{where}"
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return judge(res)


def judge(res: dict) -> dict:
    if "error" in res:
        res["ok"] = False
        res["reason"] = res["error"]
        return res
    kept = res["params_after"] / max(1, res["params_before"])
    res["params_kept"] = round(kept, 3)
    if kept > PARAMS_MAX:
        res["ok"], res["reason"] = False, f"params kept {kept:.2f} > {PARAMS_MAX}"
    elif not res["parity"] / max(1.0, res.get("logit_scale") or 0.0) < PARITY_TOL:
        res["ok"], res["reason"] = False, (f"ONNX parity {res['parity']:.3g} >= {PARITY_TOL}"
                                           f" (largest logit {res.get('logit_scale') or 0:.3g})")
    else:
        res["ok"], res["reason"] = True, ""
    return res


# ---------------------------------------------------------------------------------------------
# driver

def run_one(source: str, name: str, arm: str, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COVERAGE_EXPORTER": EXPORTER}
    cmd = [sys.executable, __file__, "--worker", f"{source}:{name}", "--arms", arm]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"model": name, "source": source, "arm": arm, "ok": False, "wall_s": round(timeout, 1),
                "reason": f"did not finish in {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"model": name, "source": source, "arm": arm, "ok": False, "wall_s": round(time.perf_counter() - t0, 1),
            "reason": f"worker exited {p.returncode}: {tail}"}


def markdown(rows: list[dict], meta: dict) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["source"], r["model"]), {})[r["arm"]] = r
    arms = ["compress", "torch_pruning"]
    tot = {a: sum(1 for v in by.values() if v.get(a, {}).get("ok")) for a in arms}
    tp_ok = {k for k, v in by.items() if v.get("torch_pruning", {}).get("ok")}
    tp_miss = [k for k in by if k not in tp_ok]
    both = sum(1 for k in tp_ok if by[k].get("compress", {}).get("ok"))
    beyond = sum(1 for k in tp_miss if by[k].get("compress", {}).get("ok"))
    lines = ["# Architecture coverage: compress vs raw Torch-Pruning", "",
             f"Command: `{meta['command']}`", "", machine_lines(meta["machine"]),
             f"- wall time of the sweep: {meta['wall_s']:.0f} s, per-model timeout {meta['timeout']:.0f} s, "
             f"{meta.get('jobs', 1)} model(s) at a time, OMP_NUM_THREADS=1; other processes shared the 2 cores "
             "(per-model seconds include that contention)",
             f"- compress arm: prune and export stages with their defaults except `onnx.exporter: "
             f"{meta.get('exporter', 'auto')}`",
             "", "Success = the pruned model runs, params <= 0.8x dense, ONNX Runtime max |error| < 1e-3 "
             "relative to the largest logit when that exceeds 1 (4 random inputs). 50 % of channels, global L2, random-init weights.", "",
             f"**Totals over {len(by)} models: compress {tot['compress']}, Torch-Pruning {tot['torch_pruning']}.** "
             f"Of the {len(tp_ok)} Torch-Pruning handles, compress handles {both}; of the {len(tp_miss)} it does not, "
             f"compress handles {beyond}.", ""]
    slow = max((r for r in rows if r["arm"] == "compress" and r.get("ok")), key=lambda r: r.get("wall_s", 0), default=None)
    if slow is not None:
        ph = slow.get("prune_phases_s")
        lines += [f"Slowest model that passed (compress): {slow['model']} ({slow['wall_s']} s in its worker: prune "
                  f"{slow.get('prune_s', 0):.1f} s, export+parity {slow.get('export_s', 0):.1f} s)"
                  + (f"; prune phases: `{json.dumps(ph)}`" if ph else ""), ""]
    lines += ["| source | model | input | compress | params kept | parity | exporter | s | Torch-Pruning | params kept "
              "| parity | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r):
        if not r:
            return ["-", "", "", ""]
        status = "ok" if r.get("ok") else "FAIL: " + r.get("reason", "").replace("|", "\\|")
        par = f"{r['parity']:.1e}" if isinstance(r.get("parity"), float) else ""
        return [status, str(r.get("params_kept", "")), par, str(r.get("wall_s", ""))]

    for (src, name), v in by.items():
        c, t = v.get("compress"), v.get("torch_pruning")
        cc, tc = cell(c), cell(t)
        shape = "x".join(map(str, (c or t or {}).get("input_shape", [])[1:] or (c or t or {}).get("input_shape", [])))
        exporter = (c or {}).get("exporter", "") or ""
        lines.append(f"| {src} | {name} | {shape} | {cc[0]} | {cc[1]} | {cc[2]} | {exporter} | {cc[3]} | {tc[0]} | "
                     f"{tc[1]} | {tc[2]} | {tc[3]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", nargs="+", default=["compress", "torch_pruning"], choices=["compress", "torch_pruning"])
    ap.add_argument("--only", nargs="*", help="model names")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per model and arm")
    ap.add_argument("--reuse", help="coverage.json whose rows are kept for the arms not run now")
    ap.add_argument("--out", default="coverage", help="results name under benchmarks/results/")
    ap.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                    help="the compress arm's export.onnx.exporter (torchscript: TorchScript first, dynamo "
                         "as the fallback; several times faster on CPU)")
    ap.add_argument("--jobs", type=int, default=1, help="models run side by side")
    ap.add_argument("--resume", help="a .partial.jsonl of an interrupted sweep: its rows are kept")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        source, name = args.worker.split(":", 1)
        print(json.dumps(worker(source, name, args.arms[0]), default=str), flush=True)
        return
    global EXPORTER
    EXPORTER = args.exporter
    models = [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM] + [("hf", n) for n in HF]
    if args.only:
        models = [m for m in models if m[1] in args.only]
    kept = []
    if args.reuse:
        kept = [r for r in json.loads(Path(args.reuse).read_text())["rows"] if r["arm"] not in args.arms]
    rows, t0 = [], time.perf_counter()
    partial = REPO / "benchmarks" / "results" / f".{args.out}.partial.jsonl"
    done = {}
    if args.resume and Path(args.resume).exists():  # rows of an interrupted sweep, one JSON per line
        for line in Path(args.resume).read_text().splitlines():
            r = json.loads(line)
            done[(r["source"], r["model"], r["arm"])] = r
    todo = []
    for source, name in models:
        for arm in args.arms:
            if (source, name, arm) in done:
                rows.append(done[(source, name, arm)])
            else:
                todo.append((source, name, arm))

    def one(job):
        r = run_one(*job, args.timeout)
        with open(partial, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        print(f"{r['arm']:14s} {r['source']:11s} {r['model']:26s} {'ok' if r.get('ok') else 'FAIL'} "
              f"{r.get('wall_s')}s {r.get('reason', '')[:150]}", flush=True)
        return r

    # --jobs > 1 runs models side by side (each worker is single-threaded): wall times per model
    # then include the contention, which the results file says
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows += list(pool.map(one, todo))
    names = {(s, n) for s, n in models}
    rows += [r for r in kept if (r["source"], r["model"]) in names]
    rows.sort(key=lambda r: [s_n for s_n in models].index((r["source"], r["model"])))
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "machine": machine(),
            "wall_s": time.perf_counter() - t0, "timeout": args.timeout, "jobs": args.jobs,
            "exporter": args.exporter}
    path = write_results(args.out, markdown(rows, meta), {"meta": meta, "rows": rows})
    print(path)


if __name__ == "__main__":
    main()
