"""Dense vs 2:4 on a GPU: Linear shapes from ViT/BERT and the convolutions of a ResNet-50 (as the
implicit GEMMs a conv kernel runs) through ``torch.sparse`` semi-structured kernels, and the whole
ResNet-50 through TensorRT (dense engine vs SPARSE_WEIGHTS engine of the same 2:4 weights, fp16
and int8). Dense and sparse are timed in the same process, interleaved, with CUDA events.

    python benchmarks/gpu_sparse.py                       # writes benchmarks/results/gpu_sparse.md
    python benchmarks/gpu_sparse.py --tokens 512 2048 --no-tensorrt

Needs a CUDA GPU with sparse tensor cores (Ampere sm80 or newer). On a machine without one it
says so and exits without writing anything: no numbers are ever made up.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.sparsity import masks  # noqa: E402
from compress.deploy.timing import BackendUnavailable  # noqa: E402
from compress.sparsity import n_m  # noqa: E402

LINEAR_SHAPES = [  # (in_features, out_features, where it comes from)
    (768, 3072, "ViT-B / BERT-base MLP up"),
    (3072, 768, "ViT-B / BERT-base MLP down"),
    (768, 768, "ViT-B / BERT-base attention proj"),
    (1024, 4096, "ViT-L / BERT-large MLP up"),
    (4096, 1024, "ViT-L / BERT-large MLP down"),
]


def cuda_time(fns: dict, warmup: int, iters: int, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved CUDA-event timing (order flips each round): median / p90 in ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    names = list(fns)
    per = max(1, iters // rounds)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else reversed(names)):
            evs = []
            for _ in range(per):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fns[k]()
                e.record()
                evs.append((s, e))
            torch.cuda.synchronize()
            samples[k] += [s.elapsed_time(e) for s, e in evs]
    return {k: {"p50": float(np.median(v)), "p90": float(np.percentile(v, 90))} for k, v in samples.items()}


def _weight_pair(out_features: int, in_features: int, dtype, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``[out, in]`` weight with 2:4 along ``in`` (the sparsify stage's groups) and its
    ``torch.sparse`` semi-structured copy (raises where the kernels reject the shape or dtype)."""
    from torch.sparse import to_sparse_semi_structured

    w = torch.randn(out_features, in_features, device="cuda", dtype=dtype, generator=gen)
    w = w * n_m.n_m_mask(w)
    return w, to_sparse_semi_structured(w)


def _time_dense_vs_24(x, w, ws, warmup: int, iters: int, rounds: int) -> dict[str, dict[str, float]]:
    return cuda_time({"dense": lambda: F.linear(x, w), "sparse": lambda: F.linear(x, ws)}, warmup, iters, rounds)


def bench_linears(tokens: list[int], dtype, warmup: int, iters: int, rounds: int) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for fin, fout, where in LINEAR_SHAPES:
        w, ws = _weight_pair(fout, fin, dtype, gen)
        for t in tokens:
            x = torch.randn(t, fin, device="cuda", dtype=dtype, generator=gen)
            err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
            res = _time_dense_vs_24(x, w, ws, warmup, iters, rounds)
            flops = 2.0 * t * fin * fout
            rows.append({"shape": f"{fout}x{fin}", "where": where, "tokens": t,
                         "dense_ms": res["dense"]["p50"], "sparse_ms": res["sparse"]["p50"],
                         "dense_p90": res["dense"]["p90"], "sparse_p90": res["sparse"]["p90"],
                         "speedup": res["dense"]["p50"] / res["sparse"]["p50"],
                         "dense_tflops": flops / res["dense"]["p50"] / 1e9, "max_abs_diff": err})
            print(f"linear {fout}x{fin} tokens {t}: dense {res['dense']['p50']:.4f} ms, "
                  f"2:4 {res['sparse']['p50']:.4f} ms ({rows[-1]['speedup']:.2f}x)", flush=True)
    return rows


def conv_gemms(model, input_shape, batch: int) -> list[dict]:
    """The Conv2d layers of ``model`` that can hold 2:4 (one group, input channels % 4 == 0) as the
    GEMMs an implicit-GEMM kernel runs: ``rows = batch*Ho*Wo``, ``reduction = C*R*S`` in (r, s, c)
    order (so 2:4 along it is 2:4 along input channels, the mask layout), ``cols = K``. One CPU
    forward at batch 1 finds the output sizes; identical shapes are merged with a count."""
    from torch import nn

    found: dict[tuple[int, int, int], dict] = {}
    hooks = []

    def hook(mod, args, out):
        k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        key = (batch * out.shape[-2] * out.shape[-1], k, mod.out_channels)
        entry = found.setdefault(key, {"rows": key[0], "reduction": key[1], "cols": key[2], "count": 0,
                                       "kernel": f"{mod.kernel_size[0]}x{mod.kernel_size[1]}"})
        entry["count"] += 1

    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.in_channels % 4 == 0:
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return list(found.values())


def bench_conv_gemms(shapes: list[dict], dtype, warmup: int, iters: int, rounds: int) -> list[dict]:
    """Each conv GEMM dense vs 2:4 (weight ``[K, C*R*S]`` masked along the reduction, the same
    groups the sparsify stage keeps). The im2col of the input is not timed: these rows bound what
    2:4 can give the convolutions themselves."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for sh in shapes:
        m, k, n = sh["rows"], sh["reduction"], sh["cols"]
        row = {**sh, "shape": f"{m}x{k} @ {k}x{n}"}
        try:
            w, ws = _weight_pair(n, k, dtype, gen)
        except (RuntimeError, ValueError) as exc:
            rows.append({**row, "error": str(exc).splitlines()[0][:120]})
            continue
        cols = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        res = _time_dense_vs_24(cols, w, ws, warmup, iters, rounds)
        rows.append({**row, "dense_ms": res["dense"]["p50"], "sparse_ms": res["sparse"]["p50"],
                     "speedup": res["dense"]["p50"] / res["sparse"]["p50"]})
        print(f"conv gemm {row['shape']} ({sh['kernel']}, x{sh['count']}): dense {res['dense']['p50']:.4f} ms, "
              f"2:4 {res['sparse']['p50']:.4f} ms ({rows[-1]['speedup']:.2f}x)", flush=True)
        del cols, w, ws
    return rows


def bench_resnet50_tensorrt(batch: int, precisions: list[str], warmup: int, iters: int, rounds: int) -> list[dict]:
    """ResNet-50 with 2:4 magnitude masks on every eligible conv; for each precision the same ONNX
    file is built twice (without / with SPARSE_WEIGHTS), so the difference is the sparse tactics
    alone. int8 reads a Q/DQ file calibrated on random inputs: the weights are random too, so these
    rows are about speed only."""
    from compress.deploy import tensorrt as trb
    from compress.deploy.onnx_io import export_onnx
    from compress.deploy.quantize import export_int8_onnx
    from compress.stages.sparsify import eligible_layers
    from compress.zoo import MODELS

    trt = trb.require_tensorrt()
    model = MODELS.get("resnet50")(num_classes=1000).eval()
    layers, skipped = eligible_layers(model, 4, None, False)
    for _, mod in layers:
        masks.set_mask(mod, n_m.n_m_mask(mod.weight))
    out = Path(tempfile.mkdtemp(prefix="gpu_sparse_"))
    onnx_path = export_onnx(model, (3, 224, 224), out / "resnet50_24.onnx")
    if "int8" in precisions:
        rng = np.random.default_rng(0)
        export_int8_onnx(onnx_path, out / "resnet50_24.int8.onnx",
                         [rng.standard_normal((8, 3, 224, 224)).astype(np.float32) for _ in range(4)])
    strong = trb.use_strong_typing(trt, "auto")
    rows = []
    for precision in precisions:
        src = trb.onnx_for_precision(onnx_path, precision, strong)
        built = {}
        for name, sparse in (("dense_math", False), ("sparse_math", True)):
            opts = trb.BuildOptions(precision=precision, sparse_weights=sparse, min_batch=1, opt_batch=batch,
                                    max_batch=batch, timing_cache=str(out / "timing.cache"))
            built[name] = trb.build_engine(src, out, f"{name}_{precision}", opts)
        runners = {n: trb.EngineRunner(b.engine, batch) for n, b in built.items()}
        res = trb.time_engines(runners, batch, warmup=warmup, iters=iters, rounds=rounds)
        del runners
        sp = built["sparse_math"].sparsity
        print(f"resnet50 TensorRT {precision} batch {batch}: dense {res['dense_math']['gpu_ms_p50']:.3f} ms, "
              f"2:4 {res['sparse_math']['gpu_ms_p50']:.3f} ms; {sp['num_picked_sparse']}/{sp['num_eligible']} "
              "eligible layers picked sparse tactics", flush=True)
        rows.append({"model": "resnet50 (2:4 on %d of %d convs/linears)" % (len(layers), len(layers) + len(skipped)),
                     "batch": batch, "precision": precision, "strongly_typed": strong,
                     "dense_ms": res["dense_math"]["gpu_ms_p50"], "sparse_ms": res["sparse_math"]["gpu_ms_p50"],
                     "dense_p90": res["dense_math"]["gpu_ms_p90"], "sparse_p90": res["sparse_math"]["gpu_ms_p90"],
                     "speedup": res["dense_math"]["gpu_ms_p50"] / res["sparse_math"]["gpu_ms_p50"],
                     "eligible": sp["num_eligible"], "picked_sparse": sp["num_picked_sparse"]})
    return rows


def environment() -> dict[str, str]:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi not available)"
    try:
        import tensorrt

        trt_v = tensorrt.__version__
    except ImportError:
        trt_v = "not installed"
    return {"device": f"{props.name} (sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)",
            "driver": driver, "cuda (torch build)": str(torch.version.cuda), "torch": torch.__version__,
            "tensorrt": trt_v, "python": platform.python_version(), "host": platform.node(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def render(env: dict, linear: list[dict], convs: list[dict], resnet: list[dict], notes: list[str], args) -> str:
    lines = ["# Dense vs 2:4 sparse on GPU", "",
             "Generated by `benchmarks/gpu_sparse.py`; dense and sparse timed in the same process, interleaved,",
             "CUDA events, medians (p90 in brackets). Command:", "",
             f"    {' '.join(shlex.quote(a) for a in ['python', 'benchmarks/gpu_sparse.py', *sys.argv[1:]])}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", f"## Linear (torch.sparse semi-structured, {args.dtype})", "",
              "| weight (out x in) | from | tokens | dense ms | 2:4 ms | speedup | dense TFLOP/s | max abs diff |",
              "|---|---|---|---|---|---|---|---|"]
    for r in linear:
        lines.append(f"| {r['shape']} | {r['where']} | {r['tokens']} | {r['dense_ms']:.4f} [{r['dense_p90']:.4f}] | "
                     f"{r['sparse_ms']:.4f} [{r['sparse_p90']:.4f}] | {r['speedup']:.2f}x | "
                     f"{r['dense_tflops']:.1f} | {r['max_abs_diff']:.3g} |")
    if convs:
        lines += ["", f"## ResNet-50 convolutions as GEMMs (torch.sparse semi-structured, {args.dtype}, "
                      f"batch {args.resnet_batch})", "",
                  "| GEMM (rows x C*R*S @ C*R*S x K) | kernel | layers | dense ms | 2:4 ms | speedup |",
                  "|---|---|---|---|---|---|"]
        for r in convs:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['kernel']} | {r['count']} | - | - | not supported: {r['error']} |")
            else:
                lines.append(f"| {r['shape']} | {r['kernel']} | {r['count']} | {r['dense_ms']:.4f} | "
                             f"{r['sparse_ms']:.4f} | {r['speedup']:.2f}x |")
        timed = [r for r in convs if "error" not in r]
        if timed:
            dense = sum(r["count"] * r["dense_ms"] for r in timed)
            sparse = sum(r["count"] * r["sparse_ms"] for r in timed)
            lines.append(f"| **all {sum(r['count'] for r in timed)} layers** | | | {dense:.3f} | {sparse:.3f} | "
                         f"{dense / sparse:.2f}x |")
    if resnet:
        lines += ["", "## ResNet-50 (TensorRT, same 2:4 weights, SPARSE_WEIGHTS off vs on)", "",
                  "| model | batch | precision | dense-math ms | sparse-math ms | speedup | eligible | picked sparse |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in resnet:
            lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['dense_ms']:.3f} [{r['dense_p90']:.3f}] | "
                         f"{r['sparse_ms']:.3f} [{r['sparse_p90']:.3f}] | {r['speedup']:.2f}x | {r['eligible']} | "
                         f"{r['picked_sparse']} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--resnet-batch", type=int, default=32)
    ap.add_argument("--resnet-precisions", nargs="+", choices=["fp32", "fp16", "int8", "best"],
                    default=["fp16", "int8"], help="TensorRT precisions for the ResNet-50 part")
    ap.add_argument("--no-tensorrt", action="store_true", help="skip the ResNet-50 TensorRT part")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_sparse.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sparse.py: no CUDA GPU is visible on this machine; nothing was measured and no results "
              "were written. Run it on an Ampere (sm80) or newer GPU.", file=sys.stderr)
        return 0
    major, _ = torch.cuda.get_device_capability(0)
    if major < 8:
        print(f"gpu_sparse.py: {torch.cuda.get_device_name(0)} has no sparse tensor cores (needs sm80+); "
              "nothing measured.", file=sys.stderr)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    notes: list[str] = []
    linear = bench_linears(args.tokens, dtype, args.warmup, args.iters, args.rounds)
    from compress.zoo import MODELS

    convs = bench_conv_gemms(conv_gemms(MODELS.get("resnet50")(num_classes=1000), (3, 224, 224), args.resnet_batch),
                             dtype, args.warmup, args.iters, args.rounds)
    resnet: list[dict] = []
    if args.no_tensorrt:
        notes.append("ResNet-50 TensorRT part skipped (--no-tensorrt).")
    else:
        try:
            resnet = bench_resnet50_tensorrt(args.resnet_batch, args.resnet_precisions, args.warmup, args.iters,
                                             args.rounds)
        except BackendUnavailable as exc:
            notes.append(f"ResNet-50 TensorRT part not measured: {exc}.")
    notes.append("torch semi-structured kernels are GEMMs: the ResNet-50 convolutions are timed as their implicit "
                 "GEMMs without the im2col, so that table bounds the conv speedup; whole-network numbers come "
                 "from TensorRT.")
    from compress.io import atomic_write_text

    atomic_write_text(args.out, render(environment(), linear, convs, resnet, notes, args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
