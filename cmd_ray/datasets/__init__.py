"""The built-in data sets by name: one module each in this package, found at import.

A module here that defines `DATASETS`, a list of `base.BuiltinDataset` entries (reader, image
shape and statistics, asymmetric noise map, default augmentation), adds those data sets to
every part of cmd-ray: config validation, `data.name`, the Parquet cache, the noise models,
augmentation and the model fit checks. Nothing else needs an edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Optional

from cmd_ray.datasets.base import DATA_ROOT, Augmentation, BuiltinDataset, DatasetInfo, RawArrays
from cmd_ray.errors import DataError

__all__ = ["DATA_ROOT", "DATASETS", "DATASET_NAMES", "Augmentation", "BuiltinDataset", "DatasetInfo", "augmentation"]


def _discover() -> dict[str, BuiltinDataset]:
    found: list[BuiltinDataset] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            found += importlib.import_module(f"{__name__}.{module.name}").DATASETS
    return {entry.name: entry for entry in sorted(found, key=lambda e: (e.listed, e.name))}


DATASETS: dict[str, BuiltinDataset] = _discover()
DATASET_NAMES = tuple(DATASETS)


def augmentation(name: str, mode: str, image_side: int, flip: Optional[bool] = None) -> Optional[Augmentation]:
    """The augmentation a run uses (None = none). `mode`: auto = the data set's default (its
    entry's `augmentation`; off for a user's data), on, off. On without a default: a crop padded
    by an eighth of the image side (4 px at 32, 1 px at 8; a fixed 4 px ruins small images) and no
    flip (wrong for digits and text). `flip` (data.flip) overrides the flip either way."""
    default = DATASETS[name].augmentation if name in DATASETS else None
    if mode == "off" or (mode == "auto" and default is None):
        return None
    chosen = default or Augmentation(crop_padding=max(1, image_side // 8), flip=False)
    return chosen if flip is None else Augmentation(chosen.crop_padding, flip)


def load_raw(name: str, root: Path) -> RawArrays:
    """A built-in data set's raw arrays from under `root`, checked against its entry's shape; a
    missing or broken file is a DataError naming data.root (the field that pointed there)."""
    if name not in DATASETS:
        raise DataError(f"data.name: got {name!r}; allowed: one of {', '.join(DATASETS)}")
    entry = DATASETS[name]
    try:
        raw = entry.read(root)
    except DataError as err:
        raise DataError(f"data.root: {err}") from None
    if raw["train_images"].shape[1:] != entry.shape:
        raise DataError(f"{name}: images have shape {raw['train_images'].shape[1:]}, expected {entry.shape}")
    return raw
