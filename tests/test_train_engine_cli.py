"""The training engine through real processes: two-process data-parallel training under torchrun
(gloo), and a ``compress run`` killed with SIGKILL mid-stage that ``--resume`` continues from its
step checkpoint to the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import yaml

from conftest import REPO, cli


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path, stages, **extra):
    r = {"name": "engine", "seed": 0, "device": "cpu", "threads": 1,
         "model": {"factory": "small_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 8},
                   "input_shape": [1, 8, 8]},
         "data": {"dataset": "digits", "batch_size": 32, "limit_train": 512, "limit_test": 128},
         "stages": stages, "gates": {"max_accuracy_drop": None}, **extra}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def test_torchrun_two_processes_gloo(tmp_path):
    recipe = _recipe(tmp_path, [
        {"kind": "train", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1}},
        {"kind": "prune", "importance": "l2", "ratio": 0.5, "scope": "global"},
        {"kind": "finetune", "epochs": 1, "distill": {"alpha": 0.7, "temperature": 4.0}},
        {"kind": "export", "onnx": {"opset": 17}},
    ])
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "compress", "run", str(recipe), "--out", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    s = json.loads((out / "summary.json").read_text())
    assert s["processes"] == 2 and s["status"] == "passed"
    steps = {st["kind"]: st.get("steps") for st in s["stages"]}
    # each process trains on its half of the 512 samples: 8 batches of 32 per epoch, not 16
    assert steps["train"] == 2 * 8 and steps["finetune"] == 8
    # evaluation inside the data-parallel stages is sharded over the ranks and its counts summed: the
    # accuracy they report equals rank 0's evaluation of the same weights over the whole split, alone
    dense = json.loads((out / "dense" / "metrics.json").read_text())
    assert s["stages"][0]["accuracy"] == dense["accuracy"]
    assert s["stages"][2]["kind"] == "finetune" and s["stages"][2]["accuracy"] == s["final"]["accuracy"]
    # rank 0 alone logs and writes: one stage log, one summary line, one run directory
    assert log.count("stage 0 train") == 1 and log.count("engine: passed") == 1, log
    # DDP replicas stay identical: after each data-parallel stage no rank's parameters differed
    assert "differed" not in log, log
    assert sorted(p.name for p in out.iterdir()) == [".lock", "dense", "model.onnx", "preprocess.json", "recipe.yaml", "report.md",
                                                      "stages", "summary.json"]
    assert not list(out.glob("stages/*/step.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_sigkill_mid_stage_then_resume_matches_an_uninterrupted_run(tmp_path):
    stages = [{"kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
              {"kind": "finetune", "epochs": 6, "batch_size": 16, "checkpoint_every": 5, "ema": 0.9,
               "optimizer": {"lr": 0.05}}]
    recipe = _recipe(tmp_path, stages)
    whole = tmp_path / "whole"
    res = cli("run", str(recipe), "--out", str(whole), "-q")
    assert res.returncode == 0, res.stderr

    killed = tmp_path / "killed"
    step_file = killed / "stages" / "01-finetune" / "step.pt"
    proc = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--out", str(killed), "-q"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not step_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert step_file.exists() and not (killed / "stages" / "01-finetune" / "DONE").exists()
    assert (killed / "stages" / "00-train" / "DONE").exists()

    res = cli("run", str(recipe), "--out", str(killed), "--resume", "-q")
    assert res.returncode == 0, res.stderr
    assert "continuing from the step checkpoint" in res.stderr
    result = json.loads((killed / "stages" / "01-finetune" / "result.json").read_text())["stage"]
    assert result["resumed_at_step"] > 0 and result["resumed_at_step"] % 5 == 0
    assert not step_file.exists()  # deleted once the stage completed
    a, b = _weights(whole / "stages" / "01-finetune"), _weights(killed / "stages" / "01-finetune")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    assert sa["final"] == sb["final"]
    assert sa["stages"][1]["train_loss"] == sb["stages"][1]["train_loss"]
