"""Datasets: real file formats written here, downloads over a real loopback HTTP server."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data import DATASETS, build_data
from tests.conftest import xy
from compress.errors import InputError
from compress.data.config import DataConfig

IDX_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def _write_idx_set(root: Path, n_train=40, n_test=20) -> dict[str, str]:
    rng = np.random.default_rng(0)
    files = {
        IDX_NAMES[0]: _idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        IDX_NAMES[1]: _idx_bytes(rng.integers(0, 10, (n_train,))),
        IDX_NAMES[2]: _idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
        IDX_NAMES[3]: _idx_bytes(rng.integers(0, 10, (n_test,))),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (root / name).write_bytes(blob)
    return {name: hashlib.md5(blob).hexdigest() for name, blob in files.items()}


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def test_digits_split_is_fixed_and_stratified():
    a = DATASETS.get("digits")(DataConfig(), seed=0)
    b = DATASETS.get("digits")(DataConfig(), seed=0)
    assert xy(a.train)[0].shape == (1437, 1, 8, 8) and xy(a.test)[0].shape == (360, 1, 8, 8)
    assert torch.equal(xy(a.test)[1], xy(b.test)[1])
    assert set(torch.bincount(xy(a.test)[1]).tolist()) <= {35, 36, 37}


def test_synthetic_is_learnable_and_sized():
    cfg = DataConfig(dataset="synthetic", num_classes=4, train_size=200, val_size=50)
    d = DATASETS.get("synthetic")(cfg, input_shape=(3, 4, 4), seed=1)
    assert xy(d.train)[0].shape == (200, 3, 4, 4) and xy(d.test)[0].shape == (50, 3, 4, 4) and d.num_classes == 4
    # nearest class mean on train separates test far above chance: there is signal
    means = torch.stack([xy(d.train)[0][xy(d.train)[1] == k].mean(0) for k in range(4)])
    pred = torch.cdist(xy(d.test)[0].flatten(1), means.flatten(1)).argmin(1)
    assert (pred == xy(d.test)[1]).float().mean() > 0.6


def test_mnist_reads_idx_files(tmp_path):
    _write_idx_set(tmp_path)
    d = build_data(DataConfig(dataset="mnist", root=str(tmp_path)), None, 0)
    assert xy(d.train)[0].shape == (40, 1, 28, 28) and xy(d.test)[1].shape == (20,)
    assert xy(d.train)[0].dtype == torch.float32 and xy(d.train)[1].dtype == torch.int64


def test_mnist_verify_md5_detects_corruption(tmp_path):
    _write_idx_set(tmp_path)
    with pytest.raises(InputError, match="md5 mismatch"):
        build_data(DataConfig(dataset="mnist", root=str(tmp_path), verify_md5=True), None, 0)


def test_regzipped_copy_of_the_same_content_passes_verification(tmp_path):
    """A .gz made again from the same data (another gzip header: stored name, mtime, level, as
    Debian's dataset-fashion-mnist ships) is accepted by its content; other content is refused."""
    from compress.data.builtin import CONTENT_MD5, verify_gz

    content = _idx_bytes(np.arange(60, dtype=np.uint8).reshape(60) % 10)
    official, again, other = tmp_path / "official.gz", tmp_path / "again.gz", tmp_path / "other.gz"
    with open(official, "wb") as f, gzip.GzipFile("t10k-labels-idx1-ubyte", "wb", 9, f, mtime=1_500_000_000) as g:
        g.write(content)
    again.write_bytes(gzip.compress(content, compresslevel=6, mtime=0))
    other.write_bytes(gzip.compress(content[:-1] + b"\x01", mtime=0))
    gz_md5, content_md5 = (hashlib.md5(official.read_bytes()).hexdigest(), hashlib.md5(content).hexdigest())
    assert hashlib.md5(again.read_bytes()).hexdigest() != gz_md5
    verify_gz(official, gz_md5, content_md5)
    verify_gz(again, gz_md5, content_md5)
    with pytest.raises(InputError, match="md5 mismatch.*decompressed content") as ei:
        verify_gz(other, gz_md5, content_md5)
    assert ei.value.field == "data.root"
    with pytest.raises(InputError, match="md5 mismatch"):
        verify_gz(again, gz_md5)  # without a content sum only the .gz bytes count
    # every file of both IDX datasets has a content sum
    assert all(set(CONTENT_MD5[n]) == set(IDX_NAMES) for n in ("mnist", "fashion_mnist"))


def test_mnist_download_over_loopback(http_root, tmp_path):
    served, url = http_root
    sums = _write_idx_set(served)
    dest = tmp_path / "mnist"
    cfg = DataConfig(dataset="fashion_mnist", root=str(dest), download=True, url=url, md5=sums)
    d = build_data(cfg, None, 0)
    assert xy(d.train)[0].shape == (40, 1, 28, 28)
    assert sorted(p.name for p in dest.iterdir()) == sorted(IDX_NAMES)


def test_download_md5_mismatch_leaves_nothing(http_root, tmp_path):
    served, url = http_root
    sums = _write_idx_set(served)
    sums[IDX_NAMES[0]] = "0" * 32
    dest = tmp_path / "mnist"
    cfg = DataConfig(dataset="mnist", root=str(dest), download=True, url=url, md5=sums)
    with pytest.raises(InputError, match="md5 mismatch"):
        build_data(cfg, None, 0)
    assert not (dest / IDX_NAMES[0]).exists()
    assert not list(dest.glob(".*part"))  # no half-written temp files


def test_download_http_error_is_input_error(http_root, tmp_path):
    _, url = http_root
    cfg = DataConfig(dataset="mnist", root=str(tmp_path / "m"), download=True, url=url + "missing/")
    with pytest.raises(InputError, match="download of .* failed"):
        build_data(cfg, None, 0)


def _cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n).tolist()}, protocol=2)


def test_cifar10_python_batches_tarball(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
            blob = _cifar_batch(6, i)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    d = build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), None, 0)
    assert xy(d.train)[0].shape == (30, 3, 32, 32) and xy(d.test)[0].shape == (6, 3, 32, 32)


def test_cifar10_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    bdir = tmp_path / "cifar-10-batches-py"
    bdir.mkdir()
    for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]:
        (bdir / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(InputError, match="refusing to load builtins.print"):
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), None, 0)


def test_imagefolder_reads_and_resizes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = build_data(DataConfig(dataset="imagefolder", root=str(tmp_path)), (3, 16, 16), 0)
    assert xy(d.train)[0].shape == (6, 3, 16, 16) and xy(d.test)[0].shape == (4, 3, 16, 16) and d.num_classes == 2
    assert torch.equal(xy(d.train)[1], torch.tensor([0, 0, 0, 1, 1, 1]))


def test_limits_take_fixed_subsets():
    a = build_data(DataConfig(limit_train=100, limit_test=50), None, 3)
    b = build_data(DataConfig(limit_train=100, limit_test=50), None, 3)
    assert len(a.train) == 100 and len(a.test) == 50 and torch.equal(xy(a.train)[0], xy(b.train)[0])


def test_custom_dataset_callable():
    cfg = DataConfig(dataset="tests.custom_data:make")
    d = build_data(cfg, (2, 3), 0)
    assert d.num_classes == 3 and xy(d.train)[0].shape[1:] == (2, 3)
