"""The recipe's ``data`` block."""
from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ..config import Strict
from .registry import DATASETS


class PreprocessConfig(Strict):
    """What the model expects as input, applied to every split (train, validation, test, calibration,
    export examples). Unset fields take the dataset's defaults (``compress.data.preprocess.DEFAULTS``);
    the resolved contract is written to summary.json, report.md and model.onnx's metadata."""

    resize: Optional[Union[int, list[int]]] = Field(
        None, description="image folders / HF images: shorter side to N (int) or [height, width]")
    crop: Optional[Union[int, list[int]]] = Field(None, description="centre crop to N or [height, width] after resize")
    mean: Optional[Union[Literal["auto"], list[float]]] = Field(
        None, description="per-channel mean subtracted from pixels in [0, 1]; 'auto': computed once from a bounded "
                          "sample of the training split and written to the run directory")
    std: Optional[Union[Literal["auto"], list[float]]] = Field(None, description="per-channel std ('auto': with mean)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    auto_samples: int = Field(512, ge=1, description="images read for mean/std 'auto'")

    @field_validator("resize", "crop")
    @classmethod
    def _size(cls, v):
        if isinstance(v, list) and (len(v) != 2 or any(d < 1 for d in v)):
            raise ValueError("must be N or [height, width] with positive sizes")
        if isinstance(v, int) and v < 1:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _mean_std_together(self):
        if (self.mean == "auto") != (self.std == "auto"):
            raise ValueError("mean: auto and std: auto go together")
        if isinstance(self.mean, list) and isinstance(self.std, list) and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} channels but std has {len(self.std)}")
        if isinstance(self.std, list) and any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class AugmentConfig(Strict):
    """Random changes to training batches only (never evaluation, calibration or export inputs).
    torchvision.transforms.v2 runs them when installed; otherwise compress's own tensor versions."""

    random_resized_crop: Optional[list[float]] = Field(
        None, description="[min_scale, max_scale] of the area kept, e.g. [0.08, 1.0]; resized back to the input size")
    horizontal_flip: float = Field(0.0, ge=0, le=1, description="probability")
    vertical_flip: float = Field(0.0, ge=0, le=1, description="probability")
    random_crop_padding: Optional[int] = Field(None, ge=1, description="pad by N (zeros) and crop back at random")
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of erasing one random rectangle")
    backend: Literal["auto", "torchvision", "builtin"] = Field(
        "auto", description="auto: torchvision.transforms.v2 when importable, else the built-in tensor ops")

    @field_validator("random_resized_crop")
    @classmethod
    def _scale(cls, v):
        if v is not None and (len(v) != 2 or not 0 < v[0] <= v[1] <= 1):
            raise ValueError("must be [min_scale, max_scale] with 0 < min_scale <= max_scale <= 1")
        return v

    def active(self) -> bool:
        return bool(self.random_resized_crop or self.horizontal_flip or self.vertical_flip
                    or self.random_crop_padding or self.random_erasing)


class DataConfig(Strict):
    dataset: str = "digits"
    root: Optional[str] = None
    batch_size: int = Field(64, ge=1)
    download: bool = False
    url: Optional[str] = Field(None, description="base URL for download (a mirror); default: the official one")
    md5: Optional[dict[str, str]] = Field(None, description="file name -> md5, overrides the official sums")
    download_timeout: float = Field(1800.0, gt=0, description="seconds one downloaded file may take in all "
                                    "(a stalled or trickling server fails after this, exit 4)")
    verify_md5: bool = Field(False, description="check md5 of files already present")
    limit_train: Optional[int] = Field(None, ge=1, description="use a fixed random subset of the training split")
    limit_test: Optional[int] = Field(None, ge=1)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="an unreadable or empty image: error (exit 2 naming it) or skip (counted in the summary)")
    check_images: int = Field(
        2000, ge=0, description="image folders: before training, decode this many images (all of a smaller split; "
                                "a seeded sample of a larger one) so a broken file fails in seconds, not mid-run")
    # loaders
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process)")
    pin_memory: bool = False
    persistent_workers: bool = Field(False, description="keep workers between epochs (needs num_workers > 0)")
    prefetch_factor: Optional[int] = Field(None, ge=1, description="batches each worker loads ahead")
    # Hugging Face datasets saved with save_to_disk (dataset: hf_disk)
    hf_disk: Optional[str] = Field(None, description="directory written by datasets' save_to_disk")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="hf_disk: {image: <column>, label: <column>} (defaults: image, label)")
    splits: dict[str, str] = Field(default_factory=dict,
                                   description="hf_disk: {train: <split>, val: <split>, test: <split>}")
    # synthetic
    num_classes: int = Field(10, ge=2)
    train_size: int = Field(1024, ge=1)
    val_size: int = Field(256, ge=1)

    @field_validator("md5")
    @classmethod
    def _md5_keys(cls, v: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        """Keys are file names inside ``data.root`` (the dataset's own files): never a path, so a
        download cannot write outside the data root."""
        for name in v or {}:
            if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
                    or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive):
                raise ValueError(f"{name!r} is not a plain file name (keys are the dataset's file names, "
                                 "e.g. train-images-idx3-ubyte.gz)")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if ":" not in v and v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r} (known: {', '.join(DATASETS.names())}, or 'module:callable')")
        return v
