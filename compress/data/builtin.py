"""The built-in datasets: digits, synthetic, mnist, fashion_mnist, cifar10, imagefolder."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, first_line
from ..memory import require_memory
from .base import DataBundle, TensorImages
from .preprocess import resolve as resolve_preprocess
from .registry import DATASETS
from .download import fetch, md5_of

# Official file names and md5 sums; recipes can override the URL (mirrors) and the sums.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# md5 of each file's decompressed IDX content. A copy gzipped again (Debian's dataset-fashion-mnist
# package: the same deflate streams without the stored file name, so each .gz differs from the
# official one) holds the same data under another .gz md5; the content sum accepts it.
# MNIST's: from the official files (their .gz md5 above match). Fashion-MNIST's: from
# dataset-fashion-mnist 0.0~git20200523.55506a9-1, whose files are the official ones with the gzip
# header's stored name dropped and another mtime: putting back the name and the original mtime
# (2017-08-31 10:50:06/27 UTC) gives each official .gz md5 above, byte for byte.
CONTENT_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
CIFAR10_ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
DEFAULT_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}


# Classes each built-in dataset has, known before any file is read (a model too narrow for them is
# refused before the data loads); imagefolder counts its class folders, synthetic has data.num_classes.
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "digit_scenes": 11}


def declared_num_classes(cfg) -> int | None:
    """The number of classes ``cfg`` (a DataConfig) will have, when known without loading it."""
    if cfg.dataset == "synthetic":
        return cfg.num_classes
    return NUM_CLASSES.get(cfg.dataset)


def in_memory(cfg, name: str, xtr, ytr, xte, yte, num_classes: int) -> DataBundle:
    """A bundle of two :class:`TensorImages` sharing the dataset's :class:`Preprocess`."""
    p = resolve_preprocess(cfg, name)
    return DataBundle(TensorImages(xtr, ytr, p), TensorImages(xte, yte, p), num_classes, preprocess=p)


class MissingData(InputError):
    """The dataset's files are not under ``data.root`` (``data.download: true`` would fetch them)."""


def _require_root(cfg, name: str) -> Path:
    if cfg.root is None:
        raise InputError(f"dataset {name!r} needs data.root", field="data.root")
    root = Path(cfg.root).expanduser()
    if not root.exists() and not cfg.download:
        error = MissingData if name in DEFAULT_URLS else InputError  # MissingData: download could fetch it
        raise error(f"directory {str(root)!r} does not exist", field="data.root")
    return root


@DATASETS.register("digits")
def digits(cfg, input_shape=None, seed: int = 0) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1797 images), stratified 80/20 split fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)  # pixel values 0..16; the preprocess divides by 16 and normalises
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return in_memory(cfg, "digits", t(xtr).unsqueeze(1), t(ytr), t(xte).unsqueeze(1), t(yte), 10)


@DATASETS.register("synthetic")
def synthetic(cfg, input_shape=None, seed: int = 0) -> DataBundle:
    """Gaussian inputs of ``model.input_shape`` plus a class-dependent pattern, so a model can learn
    something real and accuracy is meaningful (not 1/num_classes noise)."""
    if input_shape is None:
        raise InputError("synthetic data needs model.input_shape", field="model.input_shape")
    per_sample = 4 * int(np.prod(input_shape, dtype=np.float64))
    require_memory(2 * per_sample * (cfg.num_classes + cfg.train_size + cfg.val_size),
                   f"synthetic data of shape {list(input_shape)} ({cfg.train_size} + {cfg.val_size} samples)",
                   "model.input_shape")
    g = torch.Generator().manual_seed(seed)
    k = cfg.num_classes
    prototypes = torch.randn(k, *input_shape, generator=g)

    def draw(n: int):
        y = torch.randint(0, k, (n,), generator=g)
        x = 0.8 * prototypes[y] + torch.randn(n, *input_shape, generator=g)
        return x, y

    xtr, ytr = draw(cfg.train_size)
    xte, yte = draw(cfg.val_size)
    return in_memory(cfg, "synthetic", xtr, ytr, xte, yte, k)


def _read_gz(path: Path) -> bytes:
    """A whole gzip file; a truncated or corrupt one is an input error naming it."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise InputError(f"{str(path)!r} is truncated (the gzip stream ends early)", field="data.root") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{str(path)!r} is not a valid gzip file ({first_line(exc)})", field="data.root") from None
    except IsADirectoryError:
        raise InputError(f"{str(path)!r} is a directory, not a file", field="data.root") from None


def _read_idx(path: Path, ndim_expected: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080N) with ``ndim_expected`` dimensions."""
    data = _read_gz(path)
    kind = "images (3 dimensions)" if ndim_expected == 3 else "labels (1 dimension)"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim_expected:
        magic = data[:4].hex() if len(data) >= 4 else "none"
        raise InputError(f"{str(path)!r} is not an IDX file of {kind}: magic {magic}, expected "
                         f"0000080{ndim_expected}", field="data.root")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise InputError(f"{str(path)!r} is truncated (incomplete IDX header)", field="data.root")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims, dtype=np.int64)):
        raise InputError(f"{str(path)!r} is truncated: its header promises {dims} values, it holds {arr.size:,}",
                         field="data.root")
    return arr.reshape(dims)


def _md5_overrides(cfg, name: str, known: list[str]) -> dict[str, str]:
    """``data.md5``: each key must be one of the dataset's own file names."""
    given = dict(cfg.md5 or {})
    unknown = [k for k in given if k not in known]
    if unknown:
        raise InputError(f"unknown file {unknown[0]!r} for dataset {name!r} (its files: {', '.join(known)})",
                         field="data.md5")
    return given


def verify_gz(path: Path, md5: str, content_md5: str | None = None) -> None:
    """Accept ``path`` when its md5 is ``md5``, or when its decompressed content's md5 is
    ``content_md5`` (the same data gzipped again: another header or compression level changes the
    .gz bytes, not the data); otherwise an input error naming the file and both sums."""
    got = md5_of(path)
    if got == md5:
        return
    if content_md5 is not None:
        content = hashlib.md5(_read_gz(path)).hexdigest()
        if content == content_md5:
            return
        raise InputError(f"md5 mismatch for {str(path)!r}: the file's md5 is {got} (expected {md5}) and its "
                         f"decompressed content's is {content} (expected {content_md5})", field="data.root")
    raise InputError(f"md5 mismatch for {str(path)!r}: got {got}, expected {md5}", field="data.root")


def _idx_dataset(cfg, name: str, files: dict[str, str]) -> DataBundle:
    sums = {**files, **_md5_overrides(cfg, name, list(files))}
    root = _require_root(cfg, name)
    for fname, md5 in sums.items():
        path = root / fname
        if not path.exists():
            if not cfg.download:
                raise MissingData(f"missing file {str(path)!r} (set data.download: true to fetch it)",
                                  field="data.root")
            fetch((cfg.url or DEFAULT_URLS[name]) + fname, path, md5, deadline=cfg.download_timeout, root=root)
        elif cfg.verify_md5:
            verify_gz(path, md5, CONTENT_MD5.get(name, {}).get(fname))
    splits = []
    for images, labels in (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                           ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        x, y = _read_idx(root / images, 3), _read_idx(root / labels, 1)
        if len(y) != len(x):
            raise InputError(f"{str(root / labels)!r} holds {len(y):,} labels but {str(root / images)!r} holds "
                             f"{len(x):,} images", field="data.root")
        if len(y) and int(y.max()) >= NUM_CLASSES[name]:
            raise InputError(f"{str(root / labels)!r} holds label {int(y.max())}; {name} has classes "
                             f"0..{NUM_CLASSES[name] - 1}", field="data.root")
        splits.append((x, y))
    to_x = lambda a: torch.from_numpy(np.array(a)).unsqueeze(1)  # noqa: E731  (a writable uint8 copy in memory)
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    (xtr, ytr), (xte, yte) = splits
    return in_memory(cfg, name, to_x(xtr), to_y(ytr), to_x(xte), to_y(yte), NUM_CLASSES[name])


@DATASETS.register("mnist")
def mnist(cfg, input_shape=None, seed: int = 0) -> DataBundle:
    return _idx_dataset(cfg, "mnist", MNIST_FILES)


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg, input_shape=None, seed: int = 0) -> DataBundle:
    return _idx_dataset(cfg, "fashion_mnist", FASHION_FILES)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of dicts of numpy arrays. Allow exactly the globals
    that numpy arrays need and nothing else, so a crafted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_cifar_python(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise InputError(f"CIFAR-10 batch {name!r}: {exc}", field="data.root") from None
    except Exception as exc:  # parsing an untrusted file: any failure is the file's
        raise InputError(f"CIFAR-10 batch {name!r} is corrupt ({first_line(exc)})", field="data.root") from None
    try:
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise InputError(f"CIFAR-10 batch {name!r} does not hold 3x32x32 images and labels ({first_line(exc)})",
                         field="data.root") from None
    if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES["cifar10"])):
        raise InputError(f"CIFAR-10 batch {name!r} holds {len(y)} labels (range {y.min() if len(y) else '-'}.."
                         f"{y.max() if len(y) else '-'}) for {len(x)} images", field="data.root")
    return x, y


@DATASETS.register("cifar10")
def cifar10(cfg, input_shape=None, seed: int = 0) -> DataBundle:
    """CIFAR-10 from ``root``: the python batches (``cifar-10-batches-py/`` or the .tar.gz), or an
    image-folder tree ``train|test/<class>/*.jpg`` (e.g. a JPEG re-encoding)."""
    md5_archive = _md5_overrides(cfg, "cifar10", [CIFAR10_ARCHIVE[0]]).get(CIFAR10_ARCHIVE[0], CIFAR10_ARCHIVE[1])
    root = _require_root(cfg, "cifar10")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return imagefolder(cfg, input_shape, seed, name="cifar10")
    archive = root / CIFAR10_ARCHIVE[0]
    batch_dir = root / "cifar-10-batches-py"
    if not batch_dir.is_dir() and not archive.exists():
        if not cfg.download:
            raise MissingData(f"no CIFAR-10 data under {str(root)!r}", field="data.root")
        fetch((cfg.url or DEFAULT_URLS["cifar10"]) + CIFAR10_ARCHIVE[0], archive, md5_archive,
              deadline=cfg.download_timeout, root=root)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    blobs: dict[str, bytes] = {}
    if batch_dir.is_dir():
        for n in names:
            if (batch_dir / n).is_file():
                blobs[n] = (batch_dir / n).read_bytes()
    else:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar.getmembers():
                    base = m.name.rsplit("/", 1)[-1]
                    if base in names and m.isfile():
                        blobs[base] = tar.extractfile(m).read()
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise InputError(f"{str(archive)!r} is truncated or not a .tar.gz ({first_line(exc)})",
                             field="data.root") from None
        except IsADirectoryError:
            raise InputError(f"{str(archive)!r} is a directory, not a file", field="data.root") from None
    missing = [n for n in names if n not in blobs]
    if missing:
        raise InputError(f"CIFAR-10 batches missing under {str(root)!r}: {missing}", field="data.root")
    parts = [_load_cifar_python(blobs[n], n) for n in names]
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    xte, yte = parts[5]
    to_x = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731  (uint8 in memory)
    return in_memory(cfg, "cifar10", to_x(xtr), torch.from_numpy(ytr), to_x(xte), torch.from_numpy(yte), 10)


@DATASETS.register("imagefolder")
def imagefolder(cfg, input_shape=None, seed: int = 0, name: str = "imagefolder") -> DataBundle:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (optionally ``root/val/<class>/*``),
    decoded per item by Pillow (see :mod:`compress.data.imagefolder`)."""
    from .imagefolder import image_folder_bundle

    return image_folder_bundle(cfg, input_shape, _require_root(cfg, name), name)
