"""CIFAR-10 and CIFAR-100: 60,000 colour 32x32 images of 10 or 100 classes, from the
Python-pickle batches in CIFAR's own layout under `<root>` (torchvision downloads them there
when missing).
"""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cmd_ray.datasets.base import Augmentation, BuiltinDataset, RawArrays, torchvision_download
from cmd_ray.errors import DataError

if TYPE_CHECKING:
    import numpy as np

# folder under <root>, train files, test files, label key, torchvision's class
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and NumPy arrays) and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    try:
        with open(path, "rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(
            f"{path}: not a readable CIFAR batch ({type(err).__name__}: {err}); delete the folder to re-download"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: CIFAR batch has shape {data.shape}, expected (N, 3072); delete it to re-download")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar(name: str, root: Path) -> RawArrays:
    """CIFAR train/test images (N, 32, 32, 3) uint8 and labels (N,) int64."""
    import numpy as np

    folder_name, train_files, test_files, label_key, torchvision_class = LAYOUT[name]
    folder = root / folder_name
    if not all((folder / f).is_file() for f in train_files + test_files):
        torchvision_download(name, torchvision_class, root, f"put the extracted {folder_name}/ folder under {root}")
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        parts = [_read_batch(folder / f, label_key) for f in files]
        out[f"{split}_images"] = np.concatenate([p[0] for p in parts])
        out[f"{split}_labels"] = np.concatenate([p[1] for p in parts])
    return out


# The 20 CIFAR-100 super-classes with their fine classes (fine label = index in sorted names).
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
CIFAR100_FINE_NAMES = sorted(n for names in CIFAR100_SUPERCLASSES.values() for n in names)


def _cifar100_asymmetric() -> dict[int, int]:
    """Each fine class flips to the next one of its super-class (cyclically)."""
    index = {name: i for i, name in enumerate(CIFAR100_FINE_NAMES)}
    flips = {}
    for names in CIFAR100_SUPERCLASSES.values():
        for a, b in zip(names, names[1:] + names[:1]):
            flips[index[a]] = index[b]
    return flips


# CIFAR's published recipe for its natural 32x32 images.
CIFAR_AUGMENTATION = Augmentation(crop_padding=4, flip=True)

DATASETS = [
    BuiltinDataset(
        name="cifar10",
        listed=1,
        num_classes=10,
        shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        read=partial(read_cifar, "cifar10"),
        # truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
        asymmetric={9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
        augmentation=CIFAR_AUGMENTATION,
    ),
    BuiltinDataset(
        name="cifar100",
        listed=2,
        num_classes=100,
        shape=(32, 32, 3),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        read=partial(read_cifar, "cifar100"),
        asymmetric=_cifar100_asymmetric(),
        augmentation=CIFAR_AUGMENTATION,
    ),
]
