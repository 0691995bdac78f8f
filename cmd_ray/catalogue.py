"""What cmd-ray knows by name: data sets and peer architectures — one home for each fact (the
methods are registered in `cmd_ray.methods`).

Torch-free, so config validation reads it without importing torch; data loading, the noise
models and model building read the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DatasetInfo:
    """A data set: class count, image shape and the per-channel normalisation."""

    num_classes: int
    shape: tuple[int, int, int]  # H, W, C
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS = {
    "fashion-mnist": DatasetInfo(10, (28, 28, 1), (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASET_NAMES = tuple(DATASETS)


@dataclass(frozen=True)
class Augmentation:
    """A random crop of the image zero-padded by `crop_padding` pixels a side, and a horizontal
    flip of half the images where `flip`."""

    crop_padding: int
    flip: bool


# What `data.augment: auto` does per built-in data set: CIFAR's published recipe (crop 4 + flip)
# for its natural 32x32 images; none for Fashion-MNIST (the peers memorise more slowly without,
# and the memorisation regime is the point there). A user's data set is off under auto.
DEFAULT_AUGMENTATION: dict[str, Optional[Augmentation]] = {
    "fashion-mnist": None,
    "cifar10": Augmentation(crop_padding=4, flip=True),
    "cifar100": Augmentation(crop_padding=4, flip=True),
}


def augmentation(name: str, mode: str, image_side: int, flip: Optional[bool] = None) -> Optional[Augmentation]:
    """The augmentation a run uses (None = none). `mode`: auto = the data set's default (see
    DEFAULT_AUGMENTATION; off for a user's data), on, off. On without a default: a crop padded by
    an eighth of the image side (4 px at 32, 1 px at 8; a fixed 4 px ruins small images) and no
    flip (wrong for digits and text). `flip` (data.flip) overrides the flip either way."""
    default = DEFAULT_AUGMENTATION.get(name)
    if mode == "off" or (mode == "auto" and default is None):
        return None
    chosen = default or Augmentation(crop_padding=max(1, image_side // 8), flip=False)
    return chosen if flip is None else Augmentation(chosen.crop_padding, flip)


# A user's own data set by layout (cmd_ray.user_data); its classes, shape and statistics come
# from the data at import.
USER_DATASETS = ("image_folder", "parquet")
DATA_NAMES = DATASET_NAMES + USER_DATASETS
NOISE_TYPES = ("none", "symmetric", "pairflip", "asymmetric", "matrix", "labels")

# Image side each peer architecture takes (None = any).
MODEL_INPUT_SIZE = {"small_cnn": 28, "mlp": None, "preact_resnet18": 32}
MODELS = tuple(MODEL_INPUT_SIZE)


def model_fit_error(model: str, image_size: int, images: str = "the data set") -> Optional[str]:
    """Why `model` cannot take square images of side `image_size` (named `images` in the message,
    e.g. the data set's name), or None if it can. The message leaves the field name to the caller."""
    takes = MODEL_INPUT_SIZE[model]
    if takes in (None, image_size):
        return None
    fits = ", ".join(m for m, s in MODEL_INPUT_SIZE.items() if s in (None, image_size))
    return f"{model!r} takes {takes}x{takes} images, {images} has {image_size}x{image_size}; allowed here: {fits}"
