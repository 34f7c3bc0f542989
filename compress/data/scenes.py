"""``digit_scenes``: a small segmentation dataset built deterministically from real images.

M2NIST-style: one to three handwritten digits from scikit-learn's bundled digits (1,797 real 8x8
scans, upscaled 3x to 24x24) are pasted at random, non-overlapping places on a 64x64 canvas. The
label map gives every pixel its class: 0 background, ``1 + digit`` where the digit's ink is (ink:
pixel value >= 4 of 16). Train and test scenes are built from disjoint digit images (an 80/20
stratified split), so the test split measures generalisation to unseen handwriting. Everything is
fixed by the seed; nothing is downloaded. Sizes: ``data.train_size`` and ``data.val_size`` scenes.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import DataBundle, TensorImages
from .preprocess import resolve
from .registry import DATASETS

CANVAS = 64
DIGIT = 24          # 8x8 scans upscaled 3x
INK = 4.0           # of 16: below this a pixel is background
NUM_CLASSES = 11    # background + ten digits


def _scenes(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator):
    x = np.zeros((n, 1, CANVAS, CANVAS), dtype=np.float32)
    y = np.zeros((n, CANVAS, CANVAS), dtype=np.int64)
    for i in range(n):
        taken = np.zeros((CANVAS, CANVAS), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            for _try in range(20):  # a free spot; a crowded canvas just gets fewer digits
                top, left = (int(v) for v in rng.integers(0, CANVAS - DIGIT + 1, size=2))
                if not taken[top: top + DIGIT, left: left + DIGIT].any():
                    break
            else:
                continue
            k = int(rng.integers(0, len(images)))
            digit = np.kron(images[k], np.ones((3, 3), dtype=np.float32))
            x[i, 0, top: top + DIGIT, left: left + DIGIT] = digit
            y[i, top: top + DIGIT, left: left + DIGIT][digit >= INK] = 1 + int(labels[k])
            taken[top: top + DIGIT, left: left + DIGIT] = True
    return torch.from_numpy(x), torch.from_numpy(y)


@DATASETS.register("digit_scenes")
def digit_scenes(cfg, input_shape=None, seed: int = 0) -> DataBundle:
    """Segmentation scenes ``[1, 64, 64]`` with ``[64, 64]`` label maps (11 classes)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    im_tr, im_te, y_tr, y_te = train_test_split(d.images.astype(np.float32), d.target, test_size=0.2,
                                                random_state=seed, stratify=d.target)
    rng = np.random.default_rng(seed)
    xtr, ytr = _scenes(im_tr, y_tr, cfg.train_size, rng)
    xte, yte = _scenes(im_te, y_te, cfg.val_size, rng)
    p = resolve(cfg, "digit_scenes")
    return DataBundle(TensorImages(xtr, ytr, p), TensorImages(xte, yte, p), NUM_CLASSES, preprocess=p)
