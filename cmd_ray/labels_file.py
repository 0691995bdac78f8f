"""A file of real noisy labels (`noise.type: labels`): read it, then join it to a data set's images.

Two kinds of file, told apart by what they hold:

- **Keyed by path** — each label names its image: a CSV with a path column (`path`, `file`,
  `filename` or `image`) and a label column, a header-less CSV of `path,label` rows, or a `.txt`
  of `path label` lines (Clothing1M's `noisy_label_kv.txt`, WebVision's lists). Joined to the
  data set by the image's path relative to `data.path` (a path may also start with the data
  set folder's own name, or be absolute under it); row order does not matter.
- **By position** — one label per image in the data set's order: `.npy`, a `.pt` dictionary
  entry (CIFAR-10N's), a CSV with one labels column, a `.txt` with one label per line.

A label is a class name or an integer. In a text file a class name is that class; any other
integer is an index into the data set's class list (sorted folder names, or a Parquet file's
sorted class names). Arrays (`.npy`, `.pt`) hold indices.

Coverage of a keyed file is checked: a path the data set lacks is refused; an image the file
does not name is refused unless `noise.labels_coverage: listed`, which trains on the images
the file names and leaves the rest out. Pure NumPy; torch only to read a `.pt` file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from cmd_ray.errors import NoiseError
from cmd_ray.images import IMAGE_SUFFIXES

LABEL_FILE_SUFFIXES = (".npy", ".csv", ".txt", ".pt")
# Header names of the columns a CSV labels file may have.
PATH_COLUMN_NAMES = ("path", "file", "filename", "image")
LABEL_COLUMN_NAMES = ("label", "labels", "noisy_label", "noisy_labels")
CIFAR_N_KEYS = "e.g. worse_label, aggre_label, random_label1 (CIFAR-10N) or noisy_label (CIFAR-100N)"


@dataclass
class LabelsFile:
    """What a labels file holds, one entry per label: the label as written (an int from an
    array, a string from text), the line it is on, and the image path it names (keyed files)."""

    file: Path
    labels: list
    lines: list[int]
    paths: Optional[list[str]] = None  # None: matched to images by position

    @property
    def keyed(self) -> bool:
        return self.paths is not None


@dataclass(frozen=True)
class ImageKeys:
    """What a data set tells a labels file about its training images: each image's path
    relative to data.path (None where it has none: a built-in data set, a Parquet file without a
    path column), its class names in label order (None: integers only), and prefixes a path in a
    file may carry before that relative path (the data set folder's own name, its absolute path)."""

    names: Optional[list[str]] = None
    classes: Optional[list[str]] = None
    prefixes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of_folder(cls, names: Optional[list[str]], classes: Optional[list[str]], folder: Optional[str]) -> ImageKeys:
        """The keys of a user's data set at `folder` (data.path): its own name and absolute path
        are prefixes a labels file's paths may start with."""
        prefixes: tuple[str, ...] = ()
        if folder and "://" not in folder:
            where = Path(folder).expanduser()
            prefixes = (f"{where.name}/", f"{where.resolve().as_posix()}/")
        return cls(names, classes, prefixes)


# --------------------------------------------------------------------------------------
# Reading


def read_labels_file(path: Optional[str], key: Optional[str] = None) -> LabelsFile:
    """Read a labels file (`.npy`, `.csv`, `.txt` or a `.pt` dictionary entry `key`); NoiseError
    naming noise.labels (or noise.labels_key) and what is wrong, otherwise."""
    if not path:
        raise NoiseError(f"noise.labels: got null; allowed: a {_suffixes()} file when noise.type is 'labels'")
    file = Path(path).expanduser()
    if file.suffix not in LABEL_FILE_SUFFIXES:
        raise NoiseError(f"noise.labels: got {path!r}; allowed: a {_suffixes()} file")
    if not file.is_file():
        raise NoiseError(f"noise.labels: file {file} does not exist; allowed: a {_suffixes()} file")
    if file.suffix != ".pt" and key is not None:
        raise NoiseError(f"noise.labels_key: got {key!r}; allowed: null for a {file.suffix} file")
    try:
        if file.suffix == ".csv":
            return _read_csv(file)
        if file.suffix == ".txt":
            return _read_txt(file)
        array = _load_pt(file, key) if file.suffix == ".pt" else np.load(file, allow_pickle=False)
    except (UnicodeDecodeError, ValueError, OSError, csv.Error) as err:
        if isinstance(err, NoiseError):
            raise
        raise NoiseError(f"noise.labels: cannot read {file}: {str(err).splitlines()[0]}") from None
    return _from_array(file, np.asarray(array))


def _suffixes() -> str:
    return ", ".join(LABEL_FILE_SUFFIXES)


def _from_array(file: Path, labels: np.ndarray) -> LabelsFile:
    """An array of integer labels by position (a column or row vector is flattened)."""
    if labels.ndim == 2 and 1 in labels.shape:
        labels = labels.reshape(-1)
    what = "allowed: one integer label per image"
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or not np.all(np.isfinite(labels)):
        raise NoiseError(f"noise.labels: {file} holds {labels.dtype} of shape {labels.shape}; {what}")
    if labels.dtype.kind == "f" and np.any(labels != np.round(labels)):
        raise NoiseError(f"noise.labels: {file} holds fractional labels; {what}")
    values = labels.astype(np.int64).tolist()
    return LabelsFile(file, values, list(range(1, len(values) + 1)))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _looks_like_image(cell: str) -> bool:
    return PurePosixPath(cell.strip().replace("\\", "/")).suffix.lower() in IMAGE_SUFFIXES


def _read_csv(file: Path) -> LabelsFile:
    """A CSV of labels: one per line (a header or not; or all on one line); several columns with a
    header naming the labels column, as pandas' `to_csv` writes it; or keyed by path — a header
    naming a path column, or header-less `path,label` rows."""
    with open(file, newline="") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row and any(c.strip() for c in row)]
    if not rows:
        raise NoiseError(f"noise.labels: {file} is empty; allowed: one label per image")
    first = [cell.strip() for cell in rows[0][1]]
    headerless_keyed = len(first) == 2 and _looks_like_image(first[0])
    header = None if headerless_keyed or all(_is_number(c) for c in first) else first
    body = rows[1:] if header else rows
    if not header and not headerless_keyed and len(body) == 1:  # all labels on one line
        line, cells = body[0]
        body = [(line, [cell]) for cell in cells]
    width = len(body[0][1]) if body else 1
    path_column: Optional[int] = 0 if headerless_keyed else None
    label_column = 1 if headerless_keyed else 0
    if header:
        lowered = [name.lower() for name in header]
        named_paths = [i for i, name in enumerate(lowered) if name in PATH_COLUMN_NAMES]
        named_labels = [i for i, name in enumerate(lowered) if name in LABEL_COLUMN_NAMES]
        if len(named_paths) > 1:
            found = ", ".join(repr(header[i]) for i in named_paths)
            raise NoiseError(f"noise.labels: {file} has path columns {found}; allowed: one column of image paths")
        path_column = named_paths[0] if named_paths else None
        others = [i for i in range(len(header)) if i != path_column]
        if len(named_labels) == 1:
            label_column = named_labels[0]
        elif path_column is not None and len(others) == 1:  # path + one more column: that is the label
            label_column = others[0]
        elif width != 1 or len(header) != 1:
            raise NoiseError(
                f"noise.labels: {file} has columns {', '.join(repr(n) for n in header)}; allowed: one column of "
                f"labels, or a header naming one labels column ({', '.join(LABEL_COLUMN_NAMES)}) and optionally "
                f"one path column ({', '.join(PATH_COLUMN_NAMES)})"
            )
    elif width != 1 and not headerless_keyed:
        raise NoiseError(
            f"noise.labels: {file} has {width} unnamed columns; allowed: one column of labels, `path,label` rows, "
            f"or a header naming the labels column ({', '.join(LABEL_COLUMN_NAMES)})"
        )
    labels, lines, paths = [], [], []
    for line, row in body:
        cell = row[label_column].strip() if label_column < len(row) else ""
        if not cell:
            raise NoiseError(f"noise.labels: {file} line {line} has no label; allowed: one label on every line")
        labels.append(cell)
        lines.append(line)
        if path_column is not None:
            paths.append(row[path_column].strip() if path_column < len(row) else "")
    return LabelsFile(file, labels, lines, paths if path_column is not None else None)


def _read_txt(file: Path) -> LabelsFile:
    """Whitespace text: `path label` lines (Clothing1M, WebVision; a path may hold spaces: the
    label is the last word), or one label per line."""
    labels, lines, paths = [], [], []
    for line, text in enumerate(file.read_text().splitlines(), start=1):
        words = text.strip().rsplit(None, 1)
        if not words:
            continue
        if len(words) == 2:
            paths.append(words[0])
        labels.append(words[-1])
        lines.append(line)
    if not labels:
        raise NoiseError(f"noise.labels: {file} is empty; allowed: `path label` lines or one label per line")
    if paths and len(paths) != len(labels):
        where = next(n for n, text in zip(lines, labels) if len(text.split()) == 1)
        raise NoiseError(
            f"noise.labels: {file} line {where} has a label without a path, other lines have both; "
            "allowed: `path label` on every line, or a label alone on every line"
        )
    return LabelsFile(file, labels, lines, paths or None)


def _load_pt(path: Path, key: Optional[str]) -> np.ndarray:
    """One entry of a `.pt` dictionary (CIFAR-10N / CIFAR-100N's layout) or a saved tensor/array."""
    import torch

    try:
        # CIFAR-N's files hold NumPy arrays: allow exactly those, never arbitrary objects.
        with torch.serialization.safe_globals(_numpy_globals()):
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure becomes one clear line
        raise NoiseError(f"noise.labels: cannot read {path} as a .pt file: {str(err).splitlines()[0]}") from None
    if isinstance(value, dict):
        keys = ", ".join(sorted(str(k) for k in value))
        if key is None:
            raise NoiseError(f"noise.labels_key: got null; allowed for {path.name}: one of {keys} ({CIFAR_N_KEYS})")
        if key not in value:
            raise NoiseError(f"noise.labels_key: got {key!r}; allowed for {path.name}: one of {keys}")
        value = value[key]
    elif key is not None:
        raise NoiseError(
            f"noise.labels_key: got {key!r}; allowed: null ({path.name} holds one array, not a dictionary)"
        )
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _numpy_globals() -> list:
    """What unpickling a NumPy array needs, under NumPy 2's names and NumPy 1's (CIFAR-N's files)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray

    kinds = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float32, np.float64)
    return [
        multiarray._reconstruct,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *{type(np.dtype(kind)) for kind in kinds},
    ]


# --------------------------------------------------------------------------------------
# Joining a file to the images


def class_indices(found: LabelsFile, num_classes: int, classes: Optional[list[str]]) -> np.ndarray:
    """The file's labels as class indices (N,) int64: a class name is that class, an integer an
    index in [0, num_classes); NoiseError naming the first label that is neither, and its line."""
    by_name = {name: i for i, name in enumerate(classes or [])}
    out = np.empty(len(found.labels), dtype=np.int64)
    for i, (label, line) in enumerate(zip(found.labels, found.lines)):
        if isinstance(label, str) and label in by_name:
            out[i] = by_name[label]
            continue
        index = _as_index(label)
        if index is None or not 0 <= index < num_classes:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes or []) > 5 else "") if classes else ""
            names = f" or a class name ({shown})" if classes else ""
            raise NoiseError(
                f"noise.labels: {found.file} line {line}: {label!r} is not a label of this data set; "
                f"allowed: an integer 0 to {num_classes - 1}{names}"
            )
        out[i] = index
    return out


def _as_index(label) -> Optional[int]:
    if isinstance(label, (int, np.integer)):
        return int(label)
    try:
        value = float(label)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _normal(path: str) -> str:
    text = path.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def _positions(found: LabelsFile, images: ImageKeys) -> tuple[list[int], list[int]]:
    """(the image position of each file entry, entries whose path the data set lacks), each path
    matched as given, or after one of the data set's own prefixes."""
    where = {name: i for i, name in enumerate(images.names or [])}
    positions, unknown, first_line = [], [], {}
    for entry, (path, line) in enumerate(zip(found.paths or [], found.lines)):
        text = _normal(path)
        position = where.get(text)
        for prefix in images.prefixes:
            if position is None and text.startswith(prefix):
                position = where.get(text[len(prefix) :])
        if position is None:
            unknown.append(entry)
            positions.append(-1)
            continue
        if position in first_line:
            raise NoiseError(
                f"noise.labels: {found.file} line {line} names {path!r} again (first on line {first_line[position]}); "
                "allowed: one label per image"
            )
        first_line[position] = line
        positions.append(position)
    return positions, unknown


def join_labels(
    found: LabelsFile, count: int, num_classes: int, images: ImageKeys, coverage: str = "all"
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The noisy label of each of the data set's `count` training images, from `found`.

    Returns (labels, kept): labels (K,) int64 of the images trained on, and `kept` their positions
    (sorted; None = all `count` images, K = count). A keyed file is joined by path; with `coverage`
    'listed' the images it does not name are left out, with 'all' (the default) they are refused.
    A positional file needs exactly `count` labels. Every refusal is a NoiseError of one line."""
    labels = class_indices(found, num_classes, images.classes)
    if not found.keyed:
        if coverage != "all":
            raise NoiseError(
                f"noise.labels_coverage: got {coverage!r}, but {found.file} names no image paths (its labels "
                "follow the data set's order); allowed: 'all'"
            )
        if len(labels) != count:
            raise NoiseError(
                f"noise.labels: {found.file} has {len(labels)} labels, the training set {count} images; "
                "allowed: exactly one per image, in the data set's order (or a path with each label)"
            )
        return labels, None
    if images.names is None:
        raise NoiseError(
            f"noise.labels: {found.file} names images by path (line {found.lines[0]}: {found.paths[0]!r}), but "
            "this data set has no image paths; allowed: one label per image in the data set's order "
            "(a Parquet file: data.path_column names its path column)"
        )
    positions, unknown = _positions(found, images)
    named = {p for p in positions if p >= 0}
    missing = [i for i in range(count) if i not in named]
    if unknown or (missing and coverage == "all"):
        lacks = (
            f"{len(unknown)} path(s) the data set lacks (first: {found.paths[unknown[0]]!r}, line "
            f"{found.lines[unknown[0]]})"
            if unknown
            else "0 paths the data set lacks"
        )
        leaves = f"leaves out {len(missing)} of its {count} images" + (
            f" (first: {images.names[missing[0]]!r})" if missing else ""
        )
        hint = "" if unknown else " (or noise.labels_coverage: listed to train on the images it names)"
        raise NoiseError(
            f"noise.labels: {found.file} names {lacks} and {leaves}; allowed: a label for every image of "
            f"the data set, by its path relative to data.path{hint}"
        )
    order = np.argsort(np.asarray(positions), kind="stable")
    by_position = labels[order]
    if not missing:
        return by_position, None
    return by_position, np.asarray(sorted(named), dtype=np.int64)
