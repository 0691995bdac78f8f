"""Fashion-MNIST: 70,000 grey 28x28 images of 10 clothing classes, from its original IDX files.

Looked for in Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), then
`<root>/fashion-mnist`, then torchvision's layout under `<root>` (where it downloads them).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cmd_ray.datasets.base import BuiltinDataset, RawArrays, torchvision_download
from cmd_ray.errors import DataError

if TYPE_CHECKING:
    import numpy as np

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes; raise DataError if malformed."""
    import numpy as np

    try:
        with _open_maybe_gz(path) as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(
            f"{path}: cannot read ({err}); delete or reinstall it (apt-get install --reinstall dataset-fashion-mnist)"
        ) from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header; delete or reinstall the file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise DataError(f"{path}: not an IDX file of {expected_dims}-d unsigned bytes; delete or reinstall it")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header; delete or reinstall the file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: truncated IDX data ({body.size} bytes, header says {int(np.prod(dims))}); delete or reinstall it"
        )
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_folder(root: Path) -> Optional[Path]:
    """First folder holding all four Fashion-MNIST IDX files: Debian's, <root>, torchvision's."""
    for folder in (DEBIAN_FOLDER, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
        if all(_find_idx(folder, stem) for stem in FILES.values()):
            return folder
    return None


def read_fashion_mnist(root: Path) -> RawArrays:
    """Train/test images (N, 28, 28, 1) uint8 and labels (N,) int64."""
    import numpy as np

    folder = fashion_mnist_folder(root)
    if folder is None:
        hint = f"install Debian's dataset-fashion-mnist or put the four IDX files in {root / 'fashion-mnist'}"
        torchvision_download("fashion-mnist", "FashionMNIST", root, hint)
        folder = root / "FashionMNIST" / "raw"
    images = {s: read_idx(_find_idx(folder, FILES[f"{s}_images"]), 3) for s in ("train", "test")}
    labels = {s: read_idx(_find_idx(folder, FILES[f"{s}_labels"]), 1) for s in ("train", "test")}
    out = {}
    for split in ("train", "test"):
        if len(images[split]) != len(labels[split]):
            raise DataError(f"{folder}: {split} images and labels differ in count; reinstall the files")
        out[f"{split}_images"] = images[split][..., None]
        out[f"{split}_labels"] = labels[split].astype(np.int64)
    return out


DATASETS = [
    BuiltinDataset(
        name="fashion-mnist",
        listed=0,
        num_classes=10,
        shape=(28, 28, 1),
        mean=(0.2860,),
        std=(0.3530,),
        read=read_fashion_mnist,
        # T-shirt -> shirt, shirt -> T-shirt, pullover -> coat, sandal -> sneaker.
        asymmetric={0: 6, 6: 0, 2: 4, 5: 7},
        # None: the peers memorise more slowly without, and the memorisation regime is the point here.
        augmentation=None,
    )
]
