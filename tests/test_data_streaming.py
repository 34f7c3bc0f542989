"""The data layer on torch Datasets: per-item image folders, bad files, declared preprocessing,
training-only augmentation (both backends), deterministic loaders, HF datasets on disk, the
documented custom-dataset example."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data import DataConfig, build_data, make_loader
from compress.data.augment import BuiltinAugment, build_augment
from compress.data.config import AugmentConfig
from compress.data.imagefolder import BadImage
from compress.errors import InputError
from tests.conftest import REPO, cli, xy


def _folder(root: Path, bad: dict[str, bytes] | None = None, n: int = 3, size: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for name, blob in (bad or {}).items():
        (root / "train" / "a" / name).write_bytes(blob)
    return root


def test_image_folder_is_read_per_item_with_pixels_over_255_only(tmp_path):
    from PIL import Image

    root = _folder(tmp_path)
    d = build_data(DataConfig(dataset="imagefolder", root=str(root)), (3, 8, 8), 0)
    contract = d.preprocess.contract()
    assert contract["mean"] is None and contract["resize"] == [8, 8]  # no hidden statistics
    x, y = d.train[0]
    with Image.open(d.train.files[0]) as im:
        expect = torch.from_numpy(np.array(im.convert("RGB").resize((8, 8), 2))).permute(2, 0, 1) / 255.0
    assert torch.allclose(x, expect) and int(y) == 0
    assert len(d.train) == 6 and d.num_classes == 2


def test_mean_auto_is_computed_once_and_recorded(tmp_path):
    root = _folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(root), preprocess={"mean": "auto", "std": "auto"})
    d = build_data(cfg, (3, 8, 8), 0)
    c = d.preprocess.contract()
    assert c["source"].startswith("auto: computed from 6 training images")
    raw = torch.stack([d.train[i][0] * torch.tensor(c["std"]).view(3, 1, 1) + torch.tensor(c["mean"]).view(3, 1, 1)
                       for i in range(6)])
    assert torch.allclose(raw.mean(dim=(0, 2, 3)), torch.tensor(c["mean"]), atol=1e-4)
    assert xy(d.train)[0].mean(dim=(0, 2, 3)).abs().max() < 1e-3  # normalised with its own declared stats


def test_bad_image_fails_before_training_naming_the_file(tmp_path):
    root = _folder(tmp_path, {"empty.jpg": b""})
    with pytest.raises(InputError, match="empty.jpg.*an empty file"):
        build_data(DataConfig(dataset="imagefolder", root=str(root)), (3, 8, 8), 0)


def test_bad_image_in_a_loader_worker_is_one_line(tmp_path):
    root = _folder(tmp_path, {"fake.jpg": b"not a jpeg\n"})
    d = build_data(DataConfig(dataset="imagefolder", root=str(root), check_images=0), (3, 8, 8), 0)
    loader = make_loader(d.train, 8, shuffle=False, options=type(d.loader)(num_workers=1))
    with pytest.raises(BadImage) as ei:
        list(loader)
    msg = str(ei.value)
    assert "\n" not in msg and "fake.jpg" in msg and msg.startswith("data.root: cannot read image")


def test_skipped_files_are_counted_across_workers(tmp_path):
    root = _folder(tmp_path, {"fake.jpg": b"not a jpeg\n", "zero.png": b""})
    cfg = DataConfig(dataset="imagefolder", root=str(root), on_bad_file="skip", check_images=0, num_workers=2)
    d = build_data(cfg, (3, 8, 8), 0)
    batches = list(make_loader(d.train, 4, shuffle=True, seed=1, options=d.loader))
    assert sum(len(y) for _, y in batches) == 8  # a skipped item is replaced by the next readable one
    names = d.skipped_files()
    assert [Path(n).name for n in names] == ["fake.jpg", "zero.png"]
    assert d.describe()["skipped_files"] == 2


def test_loader_order_and_augmentation_follow_the_seed(tmp_path):
    cfg = DataConfig(limit_train=64, augment={"horizontal_flip": 0.5, "random_resized_crop": [0.5, 1.0],
                                              "backend": "builtin"}, num_workers=2)

    def batches():
        d = build_data(cfg, None, 0)
        return [b[0] for b in make_loader(d.train_dataset(), 16, shuffle=True, seed=5, options=d.loader)]

    a, b = batches(), batches()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    plain = build_data(DataConfig(limit_train=64), None, 0)
    assert not torch.equal(a[0], next(iter(make_loader(plain.train, 16, shuffle=True, seed=5)))[0])


def test_builtin_augment_moves_label_maps_with_images():
    torch.manual_seed(0)
    aug = BuiltinAugment(AugmentConfig(horizontal_flip=1.0, random_resized_crop=[0.3, 0.6]))
    x = torch.arange(64.0).view(1, 8, 8)
    mask = torch.arange(64).view(8, 8)
    xa, ma = aug(x, mask)
    assert xa.shape == x.shape and ma.shape == mask.shape and ma.dtype == mask.dtype
    assert set(ma.unique().tolist()) <= set(range(64))  # nearest: label values, never blends
    flip = BuiltinAugment(AugmentConfig(horizontal_flip=1.0))
    xf, mf = flip(x, mask)
    assert torch.equal(xf, x.flip(-1)) and torch.equal(mf, mask.flip(-1))


def test_augment_falls_back_to_builtin_without_torchvision(monkeypatch):
    import compress.data.augment as augment

    monkeypatch.setattr(augment, "torchvision_available", lambda: False)
    fn, backend = build_augment(AugmentConfig(horizontal_flip=1.0))
    assert backend == "builtin"
    x = torch.randn(3, 4, 4)
    assert torch.equal(fn(x, 1)[0], x.flip(-1))
    with pytest.raises(InputError, match="data.augment.backend"):
        build_augment(AugmentConfig(horizontal_flip=1.0, backend="torchvision"))


def test_torchvision_backend_matches_the_contract():
    pytest.importorskip("torchvision.transforms.v2")
    fn, backend = build_augment(AugmentConfig(horizontal_flip=1.0, backend="torchvision"))
    assert backend == "torchvision.transforms.v2"
    x, mask = torch.randn(1, 6, 6), torch.arange(36).view(6, 6)
    xa, ma = fn(x, mask)
    assert torch.equal(xa, x.flip(-1)) and torch.equal(ma, mask.flip(-1))


def test_hf_dataset_on_disk_with_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)) for _ in range(n)],
             "lbl": [i % 3 for i in range(n)]},
            features=datasets.Features({"img": datasets.Image(), "lbl": datasets.ClassLabel(num_classes=3)}))

    datasets.DatasetDict({"train": split(9), "validation": split(3), "test": split(6)}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(dataset="hf_disk", hf_disk=str(tmp_path / "hf"), columns={"image": "img", "label": "lbl"})
    d = build_data(cfg, (1, 8, 8), 0)
    assert (len(d.train), len(d.val), len(d.test), d.num_classes) == (9, 3, 6, 3)
    x, y = xy(d.test)
    assert x.shape == (6, 1, 8, 8) and y.tolist() == [0, 1, 2, 0, 1, 2] and float(x.max()) <= 1.0
    with pytest.raises(InputError, match="column 'image'"):
        build_data(cfg.model_copy(update={"columns": {}}), (1, 8, 8), 0)


def test_documented_custom_dataset_example_runs(tmp_path):
    """The README's example (examples/my_dataset.py + .yaml) through the real CLI."""
    res = cli("run", str(REPO / "examples" / "my_dataset.yaml"), "--out", str(tmp_path / "run"), "-q", cwd=REPO)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["accuracy"] >= 60 and summary["data"]["preprocess"] is None
