"""The quickstart's train stage beside a CPU hog: torch's default intra-op threads vs the count
compress chooses (compress.threads).

    python benchmarks/threads.py --repeats 3 --timeout 180 [--epochs 20]

One busy process (a Python loop) runs on the machine for the whole benchmark. Each measurement is a
real ``compress run`` of recipes/quickstart.yaml cut to its first stage (the 20-epoch dense train),
(``--epochs`` shortens it on a crowded machine), in a subprocess without OMP_NUM_THREADS: "default" passes ``--threads`` = torch's default for this
machine (one per core), "chosen" passes nothing, so compress picks, and "pinned 1" passes ``--threads 1``
(what a run started beside a busy process advises). The three alternate. A run past
``--timeout`` seconds is stopped and counted as that many seconds. Writes benchmarks/results/threads.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, machine_lines, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _hog() -> None:
    while True:
        pass


def _torch_default_threads(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def _run(recipe: Path, threads: int | None, timeout: float, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "compress", "run", str(recipe), "--out", f"{tmp}/run", "-q"]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"wall_s": timeout, "train_s": None, "finished": False, "threads": threads}
        wall = time.perf_counter() - t0
        if res.returncode not in (0, 3):
            raise SystemExit(res.stderr)
        s = json.loads(Path(f"{tmp}/run/summary.json").read_text())
    return {"wall_s": wall, "train_s": s["stages"][0]["seconds"], "finished": True,
            "threads": s["threads"]["intra_op"], "choice": s["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--epochs", type=int, default=20, help="the train stage's epochs (the quickstart has 20)")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    default = _torch_default_threads(env)
    quickstart = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    quickstart["stages"] = quickstart["stages"][:1]
    quickstart["stages"][0]["epochs"] = args.epochs
    quickstart["gates"] = {"max_accuracy_drop": None, "max_parity_error": None}
    rows = {"default": [], "chosen": [], "pinned": []}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "quickstart-train.yaml"
        recipe.write_text(yaml.safe_dump(quickstart, sort_keys=False))
        hog = multiprocessing.Process(target=_hog, daemon=True)
        hog.start()
        try:
            time.sleep(2)
            for _ in range(args.repeats):  # interleaved: both see the same machine state
                rows["default"].append(_run(recipe, default, args.timeout, env))
                rows["chosen"].append(_run(recipe, None, args.timeout, env))
                rows["pinned"].append(_run(recipe, 1, args.timeout, env))
        finally:
            hog.terminate()
            hog.join()
    m = machine()
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in rows.items()}
    unfinished = {k: sum(not r["finished"] for r in v) for k, v in rows.items()}
    chosen = sorted({r["threads"] for r in rows["chosen"] if r["finished"]})
    cmd = f"python benchmarks/threads.py --repeats {args.repeats} --timeout {args.timeout:g} --epochs {args.epochs}"
    lines = ["# Training threads beside a busy process", "", f"Command: `{cmd}`", "", machine_lines(m),
             f"- torch's default intra-op threads here: {default}; compress chose: {', '.join(map(str, chosen)) or '-'}",
             f"- load average when done: {os.getloadavg()[0]:.1f} (the busy process and the run itself count about 2 of it)",
             "", f"Each run: `compress run` of recipes/quickstart.yaml cut to its train stage ({args.epochs} epochs), with one "
             "CPU-bound Python process running beside it the whole time. Default, chosen and pinned alternate. A run "
             f"stopped at the {args.timeout:g} s limit counts as {args.timeout:g} s.", "",
             "| threads | runs | unfinished | median wall (s) | wall times (s) | train stage times (s) |",
             "|---|---|---|---|---|---|"]
    for k, v in rows.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in v)
        trains = ", ".join(f"{r['train_s']:.1f}" if r["train_s"] is not None else "-" for r in v)
        label = {"default": f"default ({default})", "chosen": f"chosen ({', '.join(map(str, chosen)) or '-'})",
                 "pinned": "pinned (--threads 1)"}[k]
        lines.append(f"| {label} | {len(v)} | {unfinished[k]} | {med[k]:.1f} | {walls} | {trains} |")
    lines += ["", f"Median wall time: default {med['default']:.1f} s, chosen {med['chosen']:.1f} s "
              f"({med['default'] / med['chosen']:.2f}x), pinned to 1 thread {med['pinned']:.1f} s "
              f"({med['default'] / med['pinned']:.2f}x)."]
    print(write_results("threads", "\n".join(lines) + "\n", {"machine": m, "command": cmd, "default_threads": default,
                                                             "rows": rows, "median_wall_s": med}))


if __name__ == "__main__":
    main()
