"""What a built-in data set is: the facts cmd-ray needs about it, in one entry.

Torch-free and NumPy-free at import (config validation and `--help` read these entries); the
readers import NumPy when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cmd_ray.console import console
from cmd_ray.errors import DataError

if TYPE_CHECKING:
    import numpy as np

# Where raw files are looked for (and downloaded), and the default of data.root.
DATA_ROOT = "~/.cache/cmd-ray/data"


@dataclass(frozen=True)
class DatasetInfo:
    """A data set's images: class count, shape and the per-channel normalisation."""

    num_classes: int
    shape: tuple[int, int, int]  # H, W, C
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Augmentation:
    """A random crop of the image zero-padded by `crop_padding` pixels a side, and a horizontal
    flip of half the images where `flip`."""

    crop_padding: int
    flip: bool


# raw arrays: train_images / test_images (N, H, W, C) uint8, train_labels / test_labels (N,) int64
RawArrays = dict[str, "np.ndarray"]


@dataclass(frozen=True)
class BuiltinDataset(DatasetInfo):
    """One built-in data set: its images (DatasetInfo), how to read it, and its defaults.

    `read(root)` returns the raw arrays from under `root` (downloading them when missing) and
    raises DataError naming the file at fault. `asymmetric` is the class map of
    `noise.type: asymmetric` (source class -> the similar class it flips to). `augmentation` is
    what `data.augment: auto` does (None = none). `listed` orders the data sets in lists and
    messages (the default data set first)."""

    name: str = ""
    read: Callable[[Path], RawArrays] = field(default=None, repr=False)  # type: ignore[assignment]
    asymmetric: dict[int, int] = field(default_factory=dict, repr=False)
    augmentation: Optional[Augmentation] = None
    listed: int = 100


def torchvision_download(name: str, dataset_class: str, root: Path, hint: str) -> None:
    """Download both splits of torchvision's `dataset_class` (e.g. "CIFAR10") under `root`;
    a failure (no network) is one DataError naming the data set and what to do (`hint`)."""
    import torchvision

    console(f"[cmd-ray] {name} not found under {root}; downloading with torchvision ...")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            getattr(torchvision.datasets, dataset_class)(str(root), train=train, download=True)
    except Exception as err:  # noqa: BLE001 - any download failure becomes one clear message
        raise DataError(f"{name}: not found under {root} and download failed ({err}); {hint}") from None
