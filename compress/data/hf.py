"""``dataset: hf_disk``: a Hugging Face dataset saved on local disk with ``save_to_disk`` (optional
extra ``pip install compress[hf-datasets]``). Nothing is downloaded: ``data.hf_disk`` names the
directory. ``data.columns`` maps compress's ``image`` and ``label`` to the dataset's column names;
``data.splits`` maps ``train``/``val``/``test`` to its split names (defaults: train, validation
when present, test). Arrow files are memory-mapped and images decoded per item."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import InputError, first_line
from ..extras import installed
from .base import DataBundle
from .preprocess import Preprocess, resolve
from .registry import DATASETS


class HFImages(Dataset):
    """One split of a ``datasets.Dataset``: ``(preprocessed image, label)`` per item."""

    def __init__(self, ds, image: str, label: str, mode: str, preprocess: Preprocess):
        self.ds, self.image, self.label, self.mode, self.preprocess = ds, image, label, mode, preprocess
        # the label column alone (Arrow, memory-mapped): lets the label check run without decoding images
        self.targets = torch.as_tensor(ds[label])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[int(i)]
        x = row[self.image]
        if hasattr(x, "convert"):  # a PIL image (datasets' Image feature)
            x = self.preprocess(x.convert(self.mode))
        else:  # arrays: [H, W] or [C, H, W] pixels
            t = torch.as_tensor(x)
            x = self.preprocess(t.unsqueeze(0) if t.dim() == 2 else t)
        return x, torch.as_tensor(row[self.label], dtype=torch.long)


@DATASETS.register("hf_disk")
def hf_disk(cfg, input_shape=None, seed: int = 0) -> DataBundle:
    if not installed("datasets"):
        raise InputError("module 'datasets' is not installed: pip install 'compress[hf-datasets]'",
                         field="data.dataset")
    import datasets

    if not cfg.hf_disk:
        raise InputError("dataset hf_disk needs data.hf_disk (a directory written by save_to_disk)",
                         field="data.hf_disk")
    root = Path(cfg.hf_disk).expanduser()
    if not root.is_dir():
        raise InputError(f"directory {str(root)!r} does not exist", field="data.hf_disk")
    try:
        dd = datasets.load_from_disk(str(root))
    except Exception as exc:  # not a save_to_disk directory, or written by an incompatible version
        raise InputError(f"cannot load {str(root)!r} with datasets.load_from_disk: {first_line(exc)}",
                         field="data.hf_disk") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise InputError(f"{str(root)!r} holds one split; save a DatasetDict with train and test splits",
                         field="data.hf_disk")
    names = {"train": "train", "test": "test", **({"val": "validation"} if "validation" in dd else {}),
             **cfg.splits}
    unknown = sorted(set(cfg.splits) - {"train", "val", "test"})
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} (keys: train, val, test)", field="data.splits")
    for key, split in names.items():
        if split not in dd:
            raise InputError(f"split {split!r} ({key}) is not in {str(root)!r} (splits: {', '.join(dd)})",
                             field="data.splits")
    cols = {"image": "image", "label": "label", **cfg.columns}
    bad = sorted(set(cfg.columns) - {"image", "label"})
    if bad:
        raise InputError(f"unknown key {bad[0]!r} (keys: image, label)", field="data.columns")
    for key, col in cols.items():
        if col not in dd[names["train"]].column_names:
            raise InputError(f"column {col!r} ({key}) is not in split {names['train']!r} (columns: "
                             f"{', '.join(dd[names['train']].column_names)})", field="data.columns")
    mode = "L" if input_shape and input_shape[0] == 1 else "RGB"
    pre = resolve(cfg, "hf_disk", tuple(input_shape[1:]) if input_shape else None)
    split = lambda key: HFImages(dd[names[key]], cols["image"], cols["label"], mode, pre)  # noqa: E731
    num_classes = None
    feature = dd[names["train"]].features.get(cols["label"])
    if hasattr(feature, "num_classes"):  # a ClassLabel column declares its classes
        num_classes = int(feature.num_classes)
    return DataBundle(split("train"), split("test"), num_classes, val=split("val") if "val" in names else None,
                      preprocess=pre)
