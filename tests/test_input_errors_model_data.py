"""Issue 13, model and data classes: bad model code, a model that does not fit its input or data,
unreadable data files and hostile downloads end in one line naming the field or file and exit 2
(exit 4 when the machine refuses: out of memory, a download that never finishes) — never a
traceback. Each case goes through the real CLI: ``validate`` and ``run`` (both run the pre-run
checks, before any stage and before the run directory is created) and, for model errors,
``inspect``."""
from __future__ import annotations

import gzip
import http.server
import io
import sys
import tarfile
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, cli

BADMODELS = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, out="tensor"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)
        self.head = nn.Conv2d(4, num_classes, 1)
        self.out = out

    def forward(self, x):
        h = self.conv(x).relu()
        y = self.fc(h.mean((2, 3)))
        if self.out == "dict":
            return {"features": h}
        if self.out == "dict_logits":
            return {"logits": y}
        if self.out == "str":
            return "not a tensor"
        if self.out == "flat":
            return y.flatten()
        if self.out == "ints":
            return y.argmax(1, keepdim=True)
        if self.out == "spatial":
            return self.head(h)
        if self.out == "raise":
            raise ValueError("forward exploded")
        return y


def tiny(**kw):
    return Tiny(**kw)


def explodes(**kw):
    raise ValueError("factory exploded\\nsecond line of the message")


def imports_missing():
    import nosuch_module_xyz  # noqa: F401


def not_a_module():
    return 42


def huge():
    return nn.Linear(2 ** 24, 2 ** 24)  # 1 PB of weights
'''

BADIMPORT = 'raise RuntimeError("module body exploded")\n'

BADDATA = '''
import torch
from torch.utils.data import TensorDataset

SHAPE = (1, 8, 8)


def three_classes(cfg, *, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, *SHAPE, generator=g)
    y = torch.arange(30) % 3
    return {"train": TensorDataset(x[:20], y[:20]), "test": TensorDataset(x[20:], y[20:]), "num_classes": 3}


def wrong_type(cfg, *, seed):
    return {"train": [1, 2, 3]}


def not_a_dict(cfg, *, seed):
    return torch.randn(3)


def short_labels(cfg, *, seed):
    x = torch.randn(30, *SHAPE)
    y = torch.arange(30) % 3
    return {"train": TensorDataset(x[:20], y[:15]), "test": TensorDataset(x[20:], y[20:])}


def labels_beyond(cfg, *, seed):
    x = torch.randn(30, *SHAPE)
    y = torch.arange(30) % 7
    return {"train": TensorDataset(x[:20], y[:20]), "test": TensorDataset(x[20:], y[20:]), "num_classes": 3}


def labels_beyond_model(cfg, *, seed):
    x = torch.randn(30, *SHAPE)
    y = torch.arange(30) % 7
    return {"train": TensorDataset(x[:20], y[:20]), "test": TensorDataset(x[20:], y[20:])}


def raises(cfg, *, seed):
    raise KeyError("no such split")
'''


def _base(**model) -> dict:
    m = {"factory": "small_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 4}, "input_shape": [1, 8, 8]}
    m.update(model)
    return {"name": "bad", "seed": 0, "device": "cpu", "model": m, "data": {"dataset": "digits", "batch_size": 64},
            "stages": [{"kind": "train", "epochs": 1}], "gates": {}}


@pytest.fixture
def work(tmp_path):
    """tmp_path with the bad model and data modules (importable: the CLI runs with cwd=tmp_path)."""
    (tmp_path / "badmodels.py").write_text(BADMODELS)
    (tmp_path / "badimport.py").write_text(BADIMPORT)
    (tmp_path / "baddata.py").write_text(BADDATA)
    return tmp_path


def _cli(work: Path, command: str, recipe: dict, *extra: str, timeout: int = 300):
    p = work / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    args = [command, str(p), *extra]
    if command == "run":
        args = ["-q", "run", str(p), "--out", str(work / "run"), *extra]
    return cli(*args, cwd=work, timeout=timeout)


def _assert_one_line(res, code: int, *needles: str, absent: tuple[str, ...] = ()) -> str:
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    for n in absent:
        assert n not in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Model: (id, model block overrides, data block overrides, exit code, needles, needs data)
MODEL_CASES = [
    ("factory-raises", {"factory": "badmodels:explodes", "kwargs": {}}, {}, 2,
     ["model.factory", "ValueError: factory exploded"], False),
    ("factory-imports-missing-module", {"factory": "badmodels:imports_missing", "kwargs": {}}, {}, 2,
     ["model.factory", "nosuch_module_xyz"], False),
    ("module-raises-on-import", {"factory": "badimport:build", "kwargs": {}}, {}, 2,
     ["model.factory", "module body exploded"], False),
    ("kwargs-rejected", {"kwargs": {"num_classes": 10, "widht": 8}}, {}, 2, ["model.kwargs", "widht"], False),
    ("not-a-module", {"factory": "badmodels:not_a_module", "kwargs": {}}, {}, 2,
     ["model.factory", "nn.Module", "int"], False),
    ("input-shape-channels", {"input_shape": [3, 8, 8]}, {}, 2, ["model.input_shape", "[1, 3, 8, 8]"], False),
    ("input-shape-rank", {"input_shape": [64]}, {}, 2, ["model.input_shape", "[1, 64]"], False),
    ("forward-raises", {"factory": "badmodels:tiny", "kwargs": {"out": "raise"}}, {}, 2,
     ["model.input_shape", "forward exploded"], False),
    ("dict-without-logits", {"factory": "badmodels:tiny", "kwargs": {"out": "dict"}}, {}, 2,
     ["model.factory", "logits", "'features'"], False),
    ("output-not-tensor", {"factory": "badmodels:tiny", "kwargs": {"out": "str"}}, {}, 2,
     ["model.factory", "logits"], False),
    ("logits-without-batch-dim", {"factory": "badmodels:tiny", "kwargs": {"out": "flat"}}, {}, 2,
     ["model.factory", "[10]", "[batch, classes"], False),
    ("integer-logits", {"factory": "badmodels:tiny", "kwargs": {"out": "ints"}}, {}, 2,
     ["model.factory", "torch.int64"], False),
    ("fewer-classes-than-builtin-labels", {"kwargs": {"num_classes": 5, "in_channels": 1, "width": 4}}, {}, 2,
     ["model.kwargs.num_classes", "5 outputs", "10 classes"], False),
    ("fewer-classes-than-synthetic", {"kwargs": {"num_classes": 3, "in_channels": 1, "width": 4}},
     {"dataset": "synthetic", "num_classes": 4, "train_size": 16, "val_size": 8}, 2,
     ["model.kwargs.num_classes", "3 outputs", "4 classes"], False),
    ("width-needs-petabytes", {"kwargs": {"num_classes": 10, "in_channels": 1, "width": 2 ** 22}}, {}, 4,
     ["model.factory", "out of memory", "bytes"], False),
    ("layer-needs-petabytes", {"factory": "badmodels:huge", "kwargs": {}}, {}, 4,
     ["model.factory", "out of memory"], False),
    ("input-needs-hundreds-of-gb", {"input_shape": [1, 300000, 300000]}, {}, 4,
     ["model.input_shape", "GB"], False),
    # need the data: only validate and run see them
    ("fewer-classes-than-custom-labels", {"kwargs": {"num_classes": 2, "in_channels": 1, "width": 4}},
     {"dataset": "baddata:three_classes"}, 2, ["model.kwargs.num_classes", "2 outputs", "3 classes"], True),
    ("input-shape-vs-data", {"kwargs": {"num_classes": 10, "in_channels": 3, "width": 4}, "input_shape": [3, 8, 8]},
     {}, 2, ["model.input_shape", "[3, 8, 8]", "[1, 8, 8]"], True),
    ("logits-do-not-fit-labels", {"factory": "badmodels:tiny", "kwargs": {"out": "spatial"}}, {}, 2,
     ["model.factory", "cannot be scored", "[1, 10, 8, 8]"], True),
]


# ``run`` performs the same pre-run checks as ``validate`` (before stage 0 and before the run
# directory exists); each kind of check is exercised through ``run`` once, to keep the file fast on
# two shared cores. ``inspect`` has no data, so it sees the model-only cases.
RUN_MODEL = {"factory-raises", "kwargs-rejected", "input-shape-channels", "dict-without-logits",
             "fewer-classes-than-builtin-labels", "width-needs-petabytes", "input-needs-hundreds-of-gb",
             "fewer-classes-than-custom-labels", "input-shape-vs-data", "logits-do-not-fit-labels"}
RUN_DATA = {"gz-truncated", "labels-shorter-than-images", "idx-wrong-magic", "image-truncated-jpeg",
            "image-directory", "cifar-tar-truncated", "callable-wrong-type"}


def _model_params():
    for case_id, model, data, code, needles, needs_data in MODEL_CASES:
        commands = ["validate"] + (["inspect"] if not needs_data else []) + (["run"] if case_id in RUN_MODEL else [])
        for command in commands:
            yield pytest.param(command, model, data, code, needles, id=f"{case_id}-{command}")


@pytest.mark.parametrize("command, model, data, code, needles", list(_model_params()))
def test_model_errors(work, command, model, data, code, needles):
    r = _base(**model)
    r["data"].update(data)
    res = _cli(work, command, r)
    _assert_one_line(res, code, *needles, absent=("second line",))
    if command == "run":
        assert not (work / "run").exists(), "the pre-run checks fail before the run directory is created"


@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_hf_model_without_the_hf_extra_names_the_extra(work, command):
    """``hf_*`` zoo models without transformers: the extra to install, from pyproject's names."""
    p = work / "recipe.yaml"
    r = _base(factory="hf_vit", kwargs={"num_classes": 10, "in_channels": 1, "image_size": 8}, input_shape=[1, 8, 8])
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    code = ("import sys; sys.modules['transformers'] = None; sys.argv = ['compress', %r, %r]\n"
            "from compress.cli import main; main()" % (command, str(p)))
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    _assert_one_line(res, 2, "model.factory", "pip install 'compress-models[hf]'", "transformers")


def test_extras_table_matches_pyproject():
    from compress.extras import EXTRA_OF_MODULE

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF_MODULE.values()) == set(extras) - {"dev"}


def test_logits_from_a_dict_are_read(work):
    """A model returning ``{"logits": ...}`` is fine (validate passes the pre-run checks)."""
    r = _base(factory="badmodels:tiny", kwargs={"out": "dict_logits"})
    res = _cli(work, "validate", r)
    assert res.returncode == 0, res.stderr
    assert "logits [1, 10]" in res.stdout


def test_validate_no_preflight_checks_the_schema_only(work):
    r = _base(factory="badmodels:explodes", kwargs={})
    res = _cli(work, "validate", r, "--no-preflight")
    assert res.returncode == 0, res.stderr
    assert "preflight:" not in res.stdout


# ---------------------------------------------------------------------------------------------
# Data: real corrupt files written here.
IDX = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
       "t10k-labels-idx1-ubyte.gz"]


def _idx(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    header = (magic or bytes([0, 0, 8, arr.ndim])) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _mnist(root: Path, n_train=40, n_test=20, **raw: bytes) -> None:
    """Four IDX .gz files; ``raw`` replaces a file's (uncompressed) content by name stem."""
    rng = np.random.default_rng(0)
    content = {
        IDX[0]: _idx(rng.integers(0, 256, (n_train, 28, 28))), IDX[1]: _idx(rng.integers(0, 10, n_train)),
        IDX[2]: _idx(rng.integers(0, 256, (n_test, 28, 28))), IDX[3]: _idx(rng.integers(0, 10, n_test)),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, blob in content.items():
        (root / name).write_bytes(gzip.compress(raw.get(name.split("-ubyte")[0].replace("-", "_"), blob)))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _images(root: Path, bad: dict[str, bytes | None]) -> None:
    """An image folder of real PNG/JPEG files plus ``bad`` (name -> bytes; None: a directory) in train/b."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for name, blob in bad.items():
        target = root / "train" / "b" / name
        target.mkdir() if blob is None else target.write_bytes(blob)


def _jpeg_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _mnist_setup(mutate):
    def setup(root: Path) -> dict:
        _mnist(root)
        mutate(root)
        return {"dataset": "mnist", "root": str(root)}
    return setup


def _idx_setup(**raw):
    def setup(root: Path) -> dict:
        _mnist(root, **raw)
        return {"dataset": "mnist", "root": str(root)}
    return setup


def _image_setup(bad):
    def setup(root: Path) -> dict:
        _images(root, bad)
        return {"dataset": "imagefolder", "root": str(root)}
    return setup


def _cifar_truncated(root: Path) -> dict:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        blob = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    root.mkdir(parents=True)
    (root / "cifar-10-python.tar.gz").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"dataset": "cifar10", "root": str(root)}


_rng = np.random.default_rng(3)
MNIST_MODEL = {"input_shape": [1, 28, 28]}
IMAGE_MODEL = {"kwargs": {"num_classes": 2, "in_channels": 3, "width": 4}, "input_shape": [3, 8, 8]}
CIFAR_MODEL = {"kwargs": {"num_classes": 10, "in_channels": 3, "width": 4}, "input_shape": [3, 32, 32]}
# (id, setup(root) -> data block, model overrides, needles)
DATA_CASES = [
    ("gz-truncated", _mnist_setup(lambda r: _truncate(r / IDX[0])), MNIST_MODEL,
     ["data.root", IDX[0], "truncated"]),
    ("gz-corrupt", _mnist_setup(lambda r: _corrupt_middle(r / IDX[0])), MNIST_MODEL, ["data.root", IDX[0]]),
    ("gz-not-gzip", _mnist_setup(lambda r: (r / IDX[2]).write_bytes(b"just some text\n" * 50)), MNIST_MODEL,
     ["data.root", IDX[2], "gzip"]),
    ("gz-empty", _mnist_setup(lambda r: (r / IDX[3]).write_bytes(b"")), MNIST_MODEL, ["data.root", IDX[3]]),
    ("gz-is-a-directory", _mnist_setup(lambda r: ((r / IDX[1]).unlink(), (r / IDX[1]).mkdir())), MNIST_MODEL,
     ["data.root", IDX[1], "directory"]),
    ("labels-shorter-than-images", _idx_setup(train_labels_idx1=_idx(_rng.integers(0, 10, 30))), MNIST_MODEL,
     ["data.root", IDX[1], "30 labels", "40 images"]),
    ("idx-wrong-magic", _idx_setup(train_images_idx3=_idx(_rng.integers(0, 256, (40, 28, 28)), bytes([0, 0, 9, 3]))),
     MNIST_MODEL, ["data.root", IDX[0], "not an IDX file", "00000903"]),
    ("idx-labels-as-images", _idx_setup(t10k_images_idx3=_idx(_rng.integers(0, 10, 20))), MNIST_MODEL,
     ["data.root", IDX[2], "not an IDX file of images"]),
    ("idx-header-promises-more", _idx_setup(train_images_idx3=_idx(_rng.integers(0, 256, (40, 28, 28)))[:-100]),
     MNIST_MODEL, ["data.root", IDX[0], "truncated"]),
    ("idx-label-out-of-range", _idx_setup(t10k_labels_idx1=_idx(np.full(20, 12))), MNIST_MODEL,
     ["data.root", IDX[3], "label 12"]),
    ("mnist-file-missing", _mnist_setup(lambda r: (r / IDX[3]).unlink()), MNIST_MODEL, ["data.root", IDX[3]]),
    ("root-missing", lambda root: {"dataset": "mnist", "root": str(root / "nope")}, MNIST_MODEL,
     ["data.root", "nope", "does not exist"]),
    ("image-0-bytes", _image_setup({"empty.jpg": b""}), IMAGE_MODEL, ["data.root", "empty.jpg", "empty"]),
    ("image-fake", _image_setup({"fake.jpg": b"this is a text file, not a JPEG\n"}), IMAGE_MODEL,
     ["data.root", "fake.jpg"]),
    ("image-truncated-jpeg", _image_setup({"cut.jpg": _jpeg_bytes()[:400]}), IMAGE_MODEL, ["data.root", "cut.jpg"]),
    ("image-truncated-png", _image_setup({"cut.png": _png_bytes()[:300]}), IMAGE_MODEL, ["data.root", "cut.png"]),
    ("image-directory", _image_setup({"x.jpg": None}), IMAGE_MODEL, ["data.root", "x.jpg", "directory"]),
    ("cifar-tar-truncated", _cifar_truncated, CIFAR_MODEL, ["data.root", "cifar-10-python.tar.gz"]),
    ("callable-wrong-type", lambda root: {"dataset": "baddata:wrong_type"}, {}, ["data.dataset", "Dataset", "list"]),
    ("callable-not-a-dict", lambda root: {"dataset": "baddata:not_a_dict"}, {}, ["data.dataset", "dict", "Tensor"]),
    ("callable-short-labels", lambda root: {"dataset": "baddata:short_labels"},
     {"kwargs": {"num_classes": 3, "in_channels": 1, "width": 4}}, ["data.dataset", "Size mismatch"]),
    ("callable-labels-beyond-model", lambda root: {"dataset": "baddata:labels_beyond_model"},
     {"kwargs": {"num_classes": 3, "in_channels": 1, "width": 4}},
     ["model.kwargs.num_classes", "3 outputs", "0..6"]),
    ("callable-labels-beyond-classes", lambda root: {"dataset": "baddata:labels_beyond"},
     {"kwargs": {"num_classes": 3, "in_channels": 1, "width": 4}}, ["data.dataset", "0..6", "num_classes is 3"]),
    ("callable-raises", lambda root: {"dataset": "baddata:raises"}, {}, ["data.dataset", "KeyError", "no such split"]),
]


def _data_params():
    for case_id, *rest in DATA_CASES:
        for command in ["validate"] + (["run"] if case_id in RUN_DATA else []):
            yield pytest.param(command, *rest, id=f"{case_id}-{command}")


@pytest.mark.parametrize("command, setup, model, needles", list(_data_params()))
def test_data_errors(work, command, setup, model, needles):
    r = _base(**model)
    r["data"] = {**setup(work / "data"), "batch_size": 16}
    res = _cli(work, command, r)
    _assert_one_line(res, 2, *needles)
    if command == "run":
        assert not (work / "run").exists()


def test_good_data_of_each_kind_still_passes(work):
    """The same builders without the damage pass the pre-run checks (the cases above fail for the
    damage, not for the setup)."""
    for setup, model in ((_mnist_setup(lambda r: None), MNIST_MODEL), (_image_setup({}), IMAGE_MODEL)):
        r = _base(**model)
        data_root = work / f"data-{model['input_shape'][0]}"
        r["data"] = {**setup(data_root), "batch_size": 16}
        res = _cli(work, "validate", r)
        assert res.returncode == 0, res.stderr
        assert "preflight: model builds" in res.stdout


# ---------------------------------------------------------------------------------------------
# Downloads over a real loopback server.

class _Server:
    """``http.server`` on 127.0.0.1 in a thread. ``/trickle/*``: headers, then one byte every
    50 ms of a 10 MB body (for at most 60 s); anything else: 404. Records the paths asked for."""

    def __init__(self):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                if not self.path.startswith("/trickle/"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(10_000_000))
                self.end_headers()
                t0 = time.monotonic()
                try:
                    while time.monotonic() - t0 < 60:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:  # the client gave up
                    pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.mark.parametrize("command, key", [("validate", "../../escaped.gz"), ("run", "../../escaped.gz"),
                                          ("validate", "sub/escaped.gz"), ("validate", "ABSOLUTE"),
                                          ("validate", "..")])
def test_md5_key_cannot_write_outside_the_data_root(work, server, command, key):
    key = str(work / "escaped.gz") if key == "ABSOLUTE" else key
    r = _base(input_shape=[1, 28, 28])
    r["data"] = {"dataset": "mnist", "root": str(work / "data" / "mnist"), "download": True, "url": server.url,
                 "md5": {key: "0" * 32}}
    res = _cli(work, command, r)
    _assert_one_line(res, 2, "data.md5")
    assert not list(work.rglob("escaped.gz")) and not server.requests


@pytest.mark.parametrize("command", ["validate", "run"])
def test_md5_key_must_be_a_file_of_the_dataset(work, server, command):
    r = _base(input_shape=[1, 28, 28])
    r["data"] = {"dataset": "mnist", "root": str(work / "mnist"), "download": True, "url": server.url,
                 "md5": {"extra.gz": "0" * 32}}
    _assert_one_line(_cli(work, command, r), 2, "data.md5", "extra.gz", IDX[0])
    assert not server.requests


def test_trickling_download_times_out_with_exit_4(work, server):
    """A server that sends a byte every 50 ms never trips a socket timeout; the total deadline
    (data.download_timeout) does. Exit 4: the recipe is fine, the network/server is not."""
    r = _base(input_shape=[1, 28, 28])
    r["data"] = {"dataset": "mnist", "root": str(work / "mnist"), "download": True, "url": server.url + "trickle/",
                 "download_timeout": 2}
    t0 = time.monotonic()
    res = _cli(work, "run", r, timeout=120)
    _assert_one_line(res, 4, "data.download", "trickle/train-images-idx3-ubyte.gz", "2 s")
    assert time.monotonic() - t0 < 60
    assert not list((work / "mnist").iterdir()), "no partial file is left behind"


def test_fetch_deadline_in_process(tmp_path, server):
    from compress.data.download import fetch
    from compress.errors import EnvironmentFailure

    t0 = time.monotonic()
    with pytest.raises(EnvironmentFailure, match="did not finish within 1 s"):
        fetch(server.url + "trickle/f.gz", tmp_path / "f.gz", None, timeout=30, deadline=1)
    assert time.monotonic() - t0 < 10
    assert not list(tmp_path.iterdir())


def test_fetch_refuses_a_destination_outside_its_root(tmp_path, server):
    from compress.data.download import fetch
    from compress.errors import InputError

    with pytest.raises(InputError, match="outside the data root"):
        fetch(server.url + "x.gz", tmp_path / "root" / ".." / "x.gz", None, root=tmp_path / "root")
    assert not server.requests


def test_validate_does_not_download(work, server):
    """``validate`` never fetches: missing files that ``run`` would download are noted, not an error."""
    r = _base(input_shape=[1, 28, 28])
    r["data"] = {"dataset": "mnist", "root": str(work / "mnist"), "download": True, "url": server.url}
    res = _cli(work, "validate", r)
    assert res.returncode == 0, res.stderr
    assert "not checked" in res.stdout and not server.requests


# ---------------------------------------------------------------------------------------------
# The checks do not change what a run does.

def test_preflight_leaves_the_global_random_state_alone():
    import random

    import torch

    from compress.config import ModelConfig
    from compress.data.config import DataConfig
    from compress.preflight import preflight
    from compress.stages.base import seed_everything

    m = ModelConfig(factory="small_cnn", kwargs={"width": 4}, input_shape=[1, 8, 8])
    seed_everything(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seed_everything(7)
    pf = preflight(m, DataConfig(), 7)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    assert pf.data is not None and pf.logits_shape == (1, 10)
