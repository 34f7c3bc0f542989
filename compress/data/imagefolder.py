"""Image folders decoded per item: ``root/<split>/<class>/<image>``.

Building the dataset lists file names only (no pixel is read), so an ImageNet-sized folder costs a
list of paths, not its decoded size; each item is opened, converted and resized by Pillow when a
loader asks for it. A file that is not a readable image (empty, truncated, text named .jpg) is one
line naming it (``data.on_bad_file: error``, exit 2), or skipped, replaced by the next readable item
and counted in the summary (``skip``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import InputError, first_line
from .base import BadFileLog, DataBundle
from .preprocess import Preprocess, resolve

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MAX_SKIPS_IN_A_ROW = 100  # more unreadable files in a row than this: the folder is broken, not a few files


class BadImage(InputError):
    """An unreadable image. DataLoader workers re-raise an error in the main process as
    ``type(exc)(message_with_traceback)``; this constructor keeps only the original message's last
    line, so the one-line contract holds with ``num_workers > 0`` too."""

    def __init__(self, message: str, field: str | None = "data.root", line: int | None = None):
        if message.startswith("Caught ") and "Traceback" in message:
            last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
            message = last.split(": ", 1)[1] if ": " in last else last
            message = message.removeprefix("data.root: ")
        super().__init__(message, field=field, line=line)


def read_image(f: Path, mode: str):
    """One decoded Pillow image in ``mode`` ("L" or "RGB"); unreadable -> :class:`BadImage`."""
    from PIL import Image, UnidentifiedImageError

    if f.is_dir():
        raise BadImage(f"{str(f)!r} is a directory, not an image")
    try:
        with Image.open(f) as im:
            return im.convert(mode)  # decodes the pixels: a truncated file fails here
    except UnidentifiedImageError:
        what = "an empty file" if f.stat().st_size == 0 else "not an image Pillow can read"
        raise BadImage(f"cannot read image {str(f)!r}: {what}") from None
    except MemoryError:
        raise
    except Exception as exc:  # OSError (truncated), SyntaxError/ValueError (broken headers), decompression bombs
        raise BadImage(f"cannot read image {str(f)!r}: {first_line(exc)}") from None


class ImageFolder(Dataset):
    """One split: ``files[i]`` with class index ``targets[i]``, decoded per item."""

    def __init__(self, files: list[Path], targets: list[int], mode: str, preprocess: Preprocess,
                 bad_files: BadFileLog | None):
        self.files, self.mode, self.preprocess, self.bad_files = files, mode, preprocess, bad_files
        self.targets = torch.tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        for step in range(min(len(self.files), MAX_SKIPS_IN_A_ROW + 1)):
            j = (i + step) % len(self.files)
            try:
                im = read_image(self.files[j], self.mode)
            except BadImage:
                if self.bad_files is None:
                    raise
                self.bad_files.add(str(self.files[j]))
                continue
            return self.preprocess(im), self.targets[j]
        raise BadImage(f"more than {MAX_SKIPS_IN_A_ROW} unreadable images in a row from {str(self.files[i])!r}")


def verify_images(bundle: DataBundle, limit: int, seed: int) -> None:
    """Decode up to ``limit`` images per split before training (every image of a split that small;
    else a seeded sample: decoding a million files would take as long as an epoch). Under
    ``on_bad_file: error`` the first unreadable one is a :class:`BadImage` naming it; under ``skip``
    it is logged like any skipped file."""
    for ds in (bundle.train, bundle.val, bundle.test):
        inner = getattr(ds, "dataset", ds)  # a Subset (limit_train) checks its folder
        if not isinstance(inner, ImageFolder) or not limit:
            continue
        n = len(inner.files)
        idx = range(n) if n <= limit else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
        for i in idx:
            f = inner.files[int(i)]
            try:
                read_image(f, inner.mode)
            except BadImage:
                if inner.bad_files is None:
                    raise
                inner.bad_files.add(str(f))


def list_split(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, targets = [], []
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        if not cdir.is_dir():
            continue
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() in IMAGE_EXT:
                files.append(f)
                targets.append(label)
    if not files:
        raise InputError(f"no images under {str(split_dir)!r}", field="data.root")
    return files, targets


def image_folder_bundle(cfg, input_shape, root: Path, name: str) -> DataBundle:
    """Train/test (and ``val`` when present) image folders. Images are resized to
    ``data.preprocess.resize`` (default: ``model.input_shape``'s H x W); channels (1 or 3) follow
    ``model.input_shape``; pixels / 255, then the declared mean/std (none unless given)."""
    if input_shape is not None and (len(input_shape) != 3 or input_shape[0] not in (1, 3)):
        raise InputError(f"image folders need [channels, height, width] with 1 or 3 channels, got "
                         f"{list(input_shape)}", field="model.input_shape")
    train_dir, test_dir, val_dir = root / "train", root / "test", root / "val"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise InputError(f"directory {str(d)!r} does not exist", field="data.root")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    mode = "L" if input_shape and input_shape[0] == 1 else "RGB"
    pre = resolve(cfg, name, tuple(input_shape[1:]) if input_shape else None)
    log = BadFileLog() if cfg.on_bad_file == "skip" else None
    split = lambda d: ImageFolder(*list_split(d, classes), mode, pre, log)  # noqa: E731
    val = split(val_dir) if val_dir.is_dir() else None
    return DataBundle(split(train_dir), split(test_dir), len(classes), val=val, preprocess=pre, bad_files=log,
                      verify=verify_images)


__all__ = ["BadImage", "ImageFolder", "image_folder_bundle", "list_split", "read_image", "verify_images"]
