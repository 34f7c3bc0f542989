"""Run the quickstart recipe for several seeds and record accuracy, size, latency and wall time.

    python benchmarks/quickstart.py --seeds 0 1 2

Each run is a real `compress run` in a subprocess; dense and compressed latencies inside a run are
measured in one process, interleaved (the benchmark stage). Writes benchmarks/results/quickstart.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, machine_lines, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "compress", "run", args.recipe, "--out", f"{tmp}/run",
                                  "--set", f"seed={seed}", "--quiet"], capture_output=True, text=True, cwd=REPO)
            wall = time.perf_counter() - t0
            if res.returncode not in (0, 3):
                raise SystemExit(res.stderr)
            s = json.loads(Path(f"{tmp}/run/summary.json").read_text())
        b = {r["batch_size"]: r for r in s["benchmark"]}
        rows.append({"seed": seed, "wall_s": wall, "status": s["status"],
                     "dense_acc": s["dense"]["accuracy"], "final_acc": s["final"]["accuracy"],
                     "params": (s["dense"]["params"], s["final"]["params"]),
                     "nonzero": (s["dense"]["nonzero_params"], s["final"]["nonzero_params"]),
                     "macs": (s["dense"]["macs"], s["final"]["macs"]),
                     "parity": s["export"]["parity_max_abs_error"],
                     "sparse_layers": f"{s['export']['sparsity_2_4']['sparse_layers']}/{s['export']['sparsity_2_4']['total_layers']}",
                     "latency": {bs: (r["dense_ms_p50"], r["compressed_ms_p50"], r["speedup"]) for bs, r in b.items()}})
    m = machine()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    lines = ["# Quickstart results", "", f"Command: `python benchmarks/quickstart.py --seeds {' '.join(map(str, args.seeds))}`",
             "", machine_lines(m), "",
             "Each row is one `compress run recipes/quickstart.yaml --set seed=S`. Latency: ONNX Runtime CPU, 1 thread, "
             "dense and compressed in the same process, interleaved, median of 100 calls each.", "",
             "| seed | status | wall (s) | dense acc % | final acc % | params dense -> compressed | non-zero | MACs | "
             "parity max abs | 2:4 layers | b1 dense/compr ms (speedup) | b32 dense/compr ms (speedup) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency"]
        cells = [f"{lat[bs][0]:.3f}/{lat[bs][1]:.3f} ({lat[bs][2]:.2f}x)" for bs in sorted(lat)]
        lines.append(f"| {r['seed']} | {r['status']} | {r['wall_s']:.1f} | {r['dense_acc']:.2f} | {r['final_acc']:.2f} | "
                     f"{r['params'][0]:,} -> {r['params'][1]:,} | {r['nonzero'][1]:,} | {r['macs'][0]:,} -> {r['macs'][1]:,} | "
                     f"{r['parity']:.2e} | {r['sparse_layers']} | " + " | ".join(cells) + " |")
    lines += ["", f"Median wall time {med([r['wall_s'] for r in rows]):.1f} s; median accuracy drop "
              f"{med([r['dense_acc'] - r['final_acc'] for r in rows]):.2f} pp; median batch-1 speedup "
              f"{med([r['latency'][1][2] for r in rows]):.2f}x, batch-32 speedup {med([r['latency'][32][2] for r in rows]):.2f}x.",
              "", "Notes: the digits test split has 360 images, so one image is 0.28 pp. The speedup comes from the "
              "structured pruning (fewer channels); 2:4 masks give no speedup on CPU ONNX Runtime (they need "
              "sparse tensor cores via TensorRT), they are checked for presence in the ONNX weights only."]
    path = write_results("quickstart", "\n".join(lines) + "\n", {"machine": m, "rows": rows})
    print(path.read_text())


if __name__ == "__main__":
    main()
