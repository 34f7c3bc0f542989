"""Shared fixtures: run the CLI (the real command-line code, real exit codes, real files) and write
small recipes. Tests never touch ../shared: data is digits (bundled with scikit-learn) or synthetic.

``cli()`` runs ``compress ARGS`` inside the test process by default: the same ``compress.cli.main``
the ``compress`` command calls, with argv, the working directory, stdout and stderr swapped in and
everything a run changes in the interpreter put back afterwards. Why not a subprocess per call:
most CLI tests check exit codes and one-line messages, and a fresh interpreter costs 3-6 s of CPU
(importing torch, Torch-Pruning, ONNX) per call, which was most of the suite's time on 2 cores.
What only a real process shows (signals, SIGKILL and resume, locks held by another process,
torchrun, a clean ``sys.path``, import-time behaviour, umask) uses ``cli(..., process=True)`` or
its own ``subprocess`` call; ``COMPRESS_TEST_CLI=process`` sends every call through a real process.
"""
from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Python's own warning filters for a fresh interpreter (what a subprocess would print).
_FRESH_INTERPRETER_FILTERS = [("default", None, DeprecationWarning, "__main__", 0),
                              ("ignore", None, DeprecationWarning, None, 0),
                              ("ignore", None, PendingDeprecationWarning, None, 0),
                              ("ignore", None, ImportWarning, None, 0),
                              ("ignore", None, ResourceWarning, None, 0)]


# One intra-op thread per test process unless the caller says otherwise: pytest-xdist already runs
# one worker per core, and more threads per worker oversubscribe the cores, where OpenMP threads
# spin-wait for descheduled siblings (the suite took several times longer in CPU). CLI calls in
# this process and in subprocesses inherit it; tests of the thread choice set their own.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _intra_op_threads():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


def cli(*args: str, cwd: Path | None = None, timeout: int = 600, process: bool = False) -> subprocess.CompletedProcess:
    """``compress ARGS`` with this checkout first on the path; in this process unless ``process``
    (see the module docstring)."""
    if process or os.environ.get("COMPRESS_TEST_CLI") == "process":
        return cli_process(*args, cwd=cwd, timeout=timeout)
    return _cli_in_process(list(args), cwd)


def cli_process(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m compress ARGS`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _exit_code(exc: SystemExit, err: io.StringIO) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    err.write(f"{exc.code}\n")  # what the interpreter does with sys.exit("message")
    return 1


def _installed(path: str) -> bool:
    """Part of this checkout or of the Python installation (not a test's temp folder)."""
    return path.startswith((str(REPO), sys.prefix, sys.base_prefix))


def _cli_in_process(args: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    import torch

    from compress import cli as cli_module, progress, registry

    saved = {"argv": sys.argv, "cwd": os.getcwd(), "path": list(sys.path), "modules": set(sys.modules),
             "roots": list(registry._IMPORT_ROOTS), "threads": torch.get_num_threads(),
             "progress": dict(progress._state), "sigint": signal.getsignal(signal.SIGINT),
             "sigterm": signal.getsignal(signal.SIGTERM), "root_handlers": list(logging.getLogger().handlers),
             "root_level": logging.getLogger().level}
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        sys.argv = ["compress", *args]
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.filters[:] = list(_FRESH_INTERPRETER_FILTERS)
            try:
                cli_module.main()
            except SystemExit as exc:
                code = _exit_code(exc, err)
            except BaseException:  # an uncaught error: the interpreter prints the traceback and exits 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = saved["argv"]
        os.chdir(saved["cwd"])
        # Folders a run put on sys.path for a user's module go; what a library put there (onnxruntime's
        # transformers tools add their own folder on first import) stays, as its modules stay loaded.
        sys.path[:] = [p for p in sys.path if p in saved["path"] or _installed(p)]
        registry._IMPORT_ROOTS[:] = saved["roots"]
        # A user's module imported from a test's temp folder must not answer the next test's import
        # of a module with the same name (a fresh process would not have it).
        for name in set(sys.modules) - saved["modules"]:
            origin = getattr(sys.modules.get(name), "__file__", None) or ""
            if origin and not _installed(origin):
                del sys.modules[name]
        torch.set_num_threads(saved["threads"])
        progress._state.clear()
        progress._state.update(saved["progress"])
        signal.signal(signal.SIGINT, saved["sigint"])
        signal.signal(signal.SIGTERM, saved["sigterm"])
        root = logging.getLogger()
        root.handlers[:] = saved["root_handlers"]
        root.setLevel(saved["root_level"])
    return subprocess.CompletedProcess(["compress", *args], code, out.getvalue(), err.getvalue())


def tiny_recipe(**overrides) -> dict:
    """A fast full-chain recipe on digits with a narrow small_cnn (a few seconds)."""
    r = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "model": {"factory": "small_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 16},
                  "input_shape": [1, 8, 8]},
        "data": {"dataset": "digits", "batch_size": 64},
        "stages": [
            {"kind": "train", "epochs": 3, "optimizer": {"name": "sgd", "lr": 0.1}},
            {"kind": "prune", "importance": "l2", "ratio": 0.5, "scope": "global"},
            {"kind": "finetune", "epochs": 1, "distill": {"alpha": 0.7, "temperature": 4.0}},
            {"kind": "sparsify", "pattern": "2:4"},
            {"kind": "finetune", "epochs": 1, "optimizer": {"lr": 0.005}},
            {"kind": "export", "onnx": {"opset": 17}},
            {"kind": "benchmark", "batch_sizes": [1], "iters": 20, "rounds": 2, "warmup": 2},
        ],
        # a 3-epoch net pruned by half and fine-tuned for 1 epoch drops a few points: the default
        # max_accuracy_drop (1.0 pp) is off here on purpose; tests of the gates set their own
        "gates": {"max_accuracy_drop": None},
    }
    r.update(overrides)
    return r


@pytest.fixture
def write_recipe(tmp_path):
    def _write(data: dict | str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return p

    return _write


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models train faster on one thread than on two fighting over a shared, loaded CPU (here and
    in CLI subprocesses, which inherit OMP_NUM_THREADS)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def xy(dataset):
    """All ``(inputs, targets)`` of a small dataset stacked into two tensors (tests only)."""
    import torch

    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(list(xs)), torch.stack([torch.as_tensor(y) for y in ys])
