"""The recipe's ``data`` block."""
from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Optional

from pydantic import Field, field_validator

from ..config import Strict
from .registry import DATASETS


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
