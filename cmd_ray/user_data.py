"""A user's own data set — an image folder or a Parquet file of encoded images — read into arrays.

Two layouts (`data.name`):

- `image_folder`: torchvision's ImageFolder layout, `<path>/<class name>/<image>` (PNG, JPEG,
  BMP, GIF, WebP, TIFF). Classes are the sub-folders in sorted order; the data set's order is
  class by class, files sorted by name within a class (the order a `noise.labels` file
  follows). An optional `data.test_path` folder with the same class names is the test split.
- `parquet`: one Parquet file (local or object storage) with an image column of encoded
  bytes (or Hugging Face's {bytes, path} struct), a label column (integers 0..C-1, or class
  names, numbered in sorted order) and an optional split column (`train` / `test`). An
  optional `data.test_path` Parquet file with the same columns holds test rows (Hugging Face
  data sets often come as train and test files). The data set's order is the row order of
  the training rows.

Images keep their colour as found (every image grey: 1 channel; any colour image: all RGB)
and are resized to `data.image_size` x `data.image_size` when it is set; without it every
image must already be square and of one size. An image that cannot be decoded is refused,
not skipped: a labels file without paths is matched to images by position, and dropping one would shift
every later label onto the wrong image.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from cmd_ray import storage
from cmd_ray.catalogue import USER_DATASETS
from cmd_ray.config import DataConfig
from cmd_ray.errors import DataError
from cmd_ray.images import IMAGE_SUFFIXES, decode_images
from cmd_ray.storage import is_uri

# Values of a Parquet split column: `validation` rows (Hugging Face's name) are the noisy
# validation split, held out of training like data.validation_fraction's.
SPLITS = ("train", "test", "validation")
# What an import writes; part of a source's fingerprint, so a cache written before a change here
# is imported again rather than read without what it now needs (2: each image's path).
IMPORT_LAYOUT = 2
# Column names a Parquet file's image paths (or ids) are taken from when data.path_column is null.
PATH_COLUMNS = ("path", "file", "filename", "id")


@dataclass(frozen=True)
class UserSource:
    """Where a user's data set lives and how to read it (the `data.*` keys that matter)."""

    kind: str  # image_folder | parquet
    path: str
    test_path: Optional[str] = None  # a test folder, or a Parquet file of test rows
    image_size: Optional[int] = None
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"
    num_classes: Optional[int] = None
    path_column: Optional[str] = None

    @classmethod
    def of(cls, data: DataConfig) -> Optional[UserSource]:
        """The user's data set the `data` section names, or None for a built-in one. Only the keys
        that say where the data are and how to read them: what identifies the import (the rest of
        `data.*`, e.g. a subset or a validation split, is applied to the cache, not baked in)."""
        if data.name not in USER_DATASETS:
            return None
        return cls(
            data.name,
            data.path,
            data.test_path,
            data.image_size,
            data.image_column,
            data.label_column,
            data.split_column,
            data.num_classes,
            data.path_column,
        )

    @property
    def tag(self) -> str:
        """A readable part of cache file names: the layout and the source's stem."""
        stem = Path(self.path.rstrip("/")).stem or "data"
        return f"{self.kind}-{''.join(c if c.isalnum() or c in '-_' else '_' for c in stem)}"

    def identity(self) -> SourceIdentity:
        """What identifies the source cheaply, from one listing of its files (path, size and
        modification time of each), so a changed source gets a new cache."""
        options = {k: v for k, v in self.__dict__.items() if k not in ("path", "test_path")}
        options["layout"] = IMPORT_LAYOUT
        train = _listing(self, self.path)
        test = _listing(self, self.test_path) if self.test_path else None
        payload = {"options": options, "train": train, "test": test}
        fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        times = [entry[-1] for entry in train + (test or []) if entry[-1] is not None]
        if not times:  # an empty folder (refused when read) or a store that keeps no times
            return SourceIdentity(fingerprint, None)
        modified = datetime.fromtimestamp(max(times) / 1e9, tz=timezone.utc).isoformat(timespec="seconds")
        return SourceIdentity(fingerprint, modified)


@dataclass(frozen=True)
class SourceIdentity:
    """A user's source as listed once: the fingerprint the cache is keyed by, and when it last
    changed (its newest file's modification time, UTC, ISO 8601)."""

    fingerprint: str
    modified: Optional[str]


def _listing(source: UserSource, path: str) -> list[list]:
    """[name, size, mtime_ns] of each file of a source (a Parquet source is one file, named by its
    absolute path or URI: `~/data/x.parquet` and `/home/me/data/x.parquet` are one source)."""
    if source.kind == "parquet":
        size, mtime = _source_call(storage.file_info, path)
        return [[storage.absolute(path), size, mtime]]
    return [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for folder, p in _folder_files(path)]


def _source_call(read, path: str):
    """`read(path)` for a Parquet source, its failures as one line naming data.path."""
    try:
        return read(path)
    except FileNotFoundError:
        raise DataError(
            f"data.path: {path} does not exist; allowed: a Parquet file (local or object storage)"
        ) from None
    except OSError as err:
        raise DataError(f"data.path: cannot read {path} ({str(err).splitlines()[0]})") from None


def _folder_files(path: str, field: str = "data.path") -> list[tuple[Path, Path]]:
    """(folder, image file) pairs of an ImageFolder tree in the data set's order."""
    if is_uri(path):
        raise DataError(f"{field}: got {path!r}; allowed: a local folder (for object storage, use a Parquet file)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{field}: {folder} is not a readable folder; allowed: a folder with one sub-folder per class")
    out = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        out += [(folder, f) for f in sorted(class_dir.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    return out


def first_image_side(source: UserSource) -> Optional[int]:
    """The side of the source's first image, read from its header alone (no import): an image
    folder's first file, or the first row of a Parquet file's first row group. None where it
    is not square or cannot be read (the import then says what is wrong)."""
    from PIL import Image

    try:
        if source.kind == "image_folder":
            files = _folder_files(source.path)
            if not files:
                return None
            opened = Image.open(files[0][1])
        else:
            opened = Image.open(io.BytesIO(_first_parquet_image(source)))
        with opened as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, IndexError, DataError):
        return None
    return width if width == height else None


def _first_parquet_image(source: UserSource) -> bytes:
    """The encoded bytes of a Parquet source's first image, reading one column of one row group."""
    import pyarrow.parquet as pq

    fs, where = storage.filesystem(source.path)
    with fs.open_input_file(where) as handle:
        column = pq.ParquetFile(handle).read_row_group(0, columns=[source.image_column]).column(0)
    first = column[0].as_py()
    return first["bytes"] if isinstance(first, dict) else first


# --------------------------------------------------------------------------------------
# Reading the two layouts


@dataclass
class UserRaw:
    """A user's data set in memory: images uint8 (N, H, W, C), labels int64 (N,), class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    classes: list[str]
    test_images: Optional[np.ndarray]
    test_labels: Optional[np.ndarray]
    content_sha256: str  # of every source byte read, in order
    source_bytes: int
    validation_rows: Optional[list[int]] = None  # positions in train_* held out as validation
    # Each training image's path relative to data.path (or a Parquet file's path/id column): what
    # a labels file by path is joined on. None where the data set names no images.
    train_names: Optional[list[str]] = None


def read_user_data(source: UserSource) -> UserRaw:
    """Decode the whole source once; raise DataError with one line naming the field on bad input."""
    return _read_folder(source) if source.kind == "image_folder" else _read_parquet(source)


def _read_folder_split(path: str, field: str, classes: Optional[list[str]], digest, size: int, image_size):
    files = _folder_files(path, field)
    folder = Path(path).expanduser()
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise DataError(
            f"{field}: {folder} has no class sub-folders; allowed: ImageFolder layout <path>/<class>/<image>"
        )
    empty = [name for name in found if not any(f.parent.name == name for _, f in files)]
    if empty:
        raise DataError(
            f"{field}: class folder {folder / empty[0]} has no images; allowed: {', '.join(IMAGE_SUFFIXES)} files"
        )
    if classes is None and len(found) < 2:
        raise DataError(
            f"{field}: {folder} has {len(found)} class folder ({found[0]!r}); allowed: at least 2 class folders "
            "(a classifier of one class has nothing to learn, and no label can be wrong)"
        )
    classes = classes or found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(f"{field}: class folder {unknown[0]!r} is not a training class; allowed: {', '.join(classes)}")
    blobs = []
    for _, file in files:
        try:
            blob = file.read_bytes()
        except OSError as err:
            raise DataError(f"{field}: cannot read {file} ({err.strerror})") from None
        digest.update(str(file.relative_to(folder)).encode() + b"\0" + blob)
        size += len(blob)
        blobs.append((blob, str(file)))
    labels = np.array([classes.index(f.parent.name) for _, f in files], dtype=np.int64)
    names = [f.relative_to(folder).as_posix() for _, f in files]
    return decode_images(blobs, image_size, field), labels, classes, size, names


def _read_folder(source: UserSource) -> UserRaw:
    digest = hashlib.sha256()
    images, labels, classes, size, names = _read_folder_split(
        source.path, "data.path", None, digest, 0, source.image_size
    )
    _check_class_count(source, len(classes))
    test_images = test_labels = None
    if source.test_path:
        test_images, test_labels, _, size, _ = _read_folder_split(
            source.test_path, "data.test_path", classes, digest, size, source.image_size
        )
        images, test_images = _same_channels(images, like=test_images), _same_channels(test_images, like=images)
        _check_same_shape(images, test_images)
    return UserRaw(images, labels, classes, test_images, test_labels, digest.hexdigest(), size, train_names=names)


def _check_class_count(source: UserSource, found: int) -> None:
    if source.num_classes is not None and source.num_classes != found:
        raise DataError(f"data.num_classes: got {source.num_classes}, but {source.path} has {found} classes")


def _same_channels(images: np.ndarray, like: Optional[np.ndarray] = None) -> np.ndarray:
    """Grey images as RGB where `like` has colour (one colour image in either split makes both RGB)."""
    if like is not None and like.shape[-1] == 3 and images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images


def _check_same_shape(train: np.ndarray, test: np.ndarray) -> None:
    if train.shape[1:] != test.shape[1:]:
        raise DataError(
            f"data.image_size: got null, but training images are {train.shape[1:]} and test images "
            f"{test.shape[1:]} (H, W, C); allowed: a side in pixels to resize every image to"
        )


def _parquet_table(source: UserSource, path: str, field: str):
    """(table, its bytes) of one Parquet file of a source, with the image and label columns checked."""
    import pyarrow as pa

    blob = _source_call(storage.read_bytes, path)
    try:
        table = storage.parquet_from_bytes(blob)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{field}: {path} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
    columns = table.column_names
    for field_name, column in (("data.image_column", source.image_column), ("data.label_column", source.label_column)):
        if column not in columns:
            raise DataError(f"{field_name}: {column!r} is not a column of {path}; allowed: one of {', '.join(columns)}")
    if table.num_rows == 0:
        raise DataError(f"{field}: {path} has no rows")
    return table, blob


def _read_parquet(source: UserSource) -> UserRaw:
    import pyarrow as pa

    table, blob = _parquet_table(source, source.path, "data.path")
    splits = _parquet_splits(table, source)
    names = _parquet_names(table, source)
    content, size = hashlib.sha256(blob), len(blob)
    if source.test_path:  # a file of test rows, read as if its rows were the data.path's test rows
        test_table, test_blob = _parquet_table(source, source.test_path, "data.test_path")
        content.update(test_blob)
        size += len(test_blob)
        keep = [source.image_column, source.label_column]
        for column in keep:
            ours, theirs = table.schema.field(column).type, test_table.schema.field(column).type
            if _type_kind(ours) != _type_kind(theirs):
                raise DataError(
                    f"data.test_path: column {column!r} of {source.test_path} is {theirs}, of {source.path} "
                    f"{ours}; allowed: the same columns in both files"
                )
        try:
            table = pa.concat_tables([table.select(keep), test_table.select(keep).cast(table.select(keep).schema)])
        except (pa.ArrowException, ValueError) as err:
            raise DataError(
                f"data.test_path: the columns of {source.test_path} do not match {source.path}'s "
                f"({str(err).splitlines()[0]}); allowed: the same image and label columns"
            ) from None
        splits = np.concatenate([splits, np.full(test_table.num_rows, "test", dtype=object)])
    labels, classes = _parquet_labels(table.column(source.label_column), source)
    blobs = _parquet_images(table.column(source.image_column), source)
    images = decode_images(
        zip(blobs, (f"{source.path} row {i}" for i in range(len(blobs)))), source.image_size, "data.path"
    )
    train, test = np.isin(splits, ("train", "validation")), splits == "test"
    held_out = np.flatnonzero(splits[train] == "validation")
    unseen = sorted({classes[i] for i in labels[test]} - {classes[i] for i in labels[train]})
    if unseen and pa.types.is_string(table.schema.field(source.label_column).type):
        raise DataError(
            f"data.label_column: test rows name class {unseen[0]!r}, which no training row has; "
            "allowed: the training rows' classes"
        )
    if not (splits == "train").any():
        raise DataError(f"data.split_column: {source.path} has no 'train' rows; allowed values: {', '.join(SPLITS)}")
    has_test = bool(test.any())
    return UserRaw(
        images[train],
        labels[train],
        classes,
        images[test] if has_test else None,
        labels[test] if has_test else None,
        content.hexdigest(),
        size,
        [int(i) for i in held_out] if held_out.size else None,
        _unique_names(None if names is None else [names[i] for i in np.flatnonzero(train[: len(names)])], source),
    )


def _type_kind(arrow_type) -> str:
    """integer | string | binary | struct | the type itself: what must match across two files."""
    import pyarrow as pa

    for kind, test in (("integer", pa.types.is_integer), ("struct", pa.types.is_struct)):
        if test(arrow_type):
            return kind
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "binary"
    return str(arrow_type)


def _parquet_splits(table, source: UserSource) -> np.ndarray:
    if source.split_column not in table.column_names:
        return np.full(table.num_rows, "train", dtype=object)
    values = np.asarray(table.column(source.split_column).to_pylist(), dtype=object)
    bad = [v for v in values if v not in SPLITS]
    if bad:
        raise DataError(
            f"data.split_column: {source.split_column!r} holds {bad[0]!r}; allowed values: {', '.join(SPLITS)}"
        )
    return values


def _parquet_names(table, source: UserSource) -> Optional[list[str]]:
    """Each row's image path or id, as text: data.path_column, else a column named path, file,
    filename or id, else the image struct's own `path` field where every row has one (None when
    the file names no images: a labels file is then matched by row order)."""
    import pyarrow as pa

    column = source.path_column or next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if source.path_column and source.path_column not in table.column_names:
        raise DataError(
            f"data.path_column: {source.path_column!r} is not a column of {source.path}; "
            f"allowed: one of {', '.join(table.column_names)}"
        )
    if column is not None:
        values = table.column(column).to_pylist()
    else:
        images = table.column(source.image_column)
        if not pa.types.is_struct(images.type) or images.type.get_field_index("path") < 0:
            return None
        values = images.combine_chunks().field("path").to_pylist()
        if any(v in (None, "") for v in values):
            return None
    where = f"data.path_column: {column or 'the image path'!r} of {source.path}"
    if any(v is None for v in values):
        raise DataError(f"{where} has an empty value on row {values.index(None)}; allowed: a path or id on every row")
    return [str(v) for v in values]


def _unique_names(names: Optional[list[str]], source: UserSource) -> Optional[list[str]]:
    """The training rows' names, refused when one repeats (a labels file could not tell them apart)."""
    if names is not None and len(set(names)) != len(names):
        seen: set[str] = set()
        repeated = next(n for n in names if n in seen or seen.add(n))
        raise DataError(
            f"data.path_column: {source.path} names {repeated!r} on two training rows; allowed: one row per image"
        )
    return names


def _parquet_labels(column, source: UserSource) -> tuple[np.ndarray, list[str]]:
    """Integer labels as they are, class names numbered in sorted order; (labels, class names)."""
    import pyarrow as pa

    where = f"data.label_column: {source.label_column!r} of {source.path}"
    if column.null_count:
        raise DataError(f"{where} has {column.null_count} empty label(s); allowed: a label on every row")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        names = column.to_pylist()
        classes = sorted(set(names))
        _check_class_count(source, len(classes))
        if len(classes) < 2:
            raise DataError(f"{where}: only one class ({classes[0]!r}); allowed: at least 2 classes")
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[n] for n in names], dtype=np.int64), classes
    if not pa.types.is_integer(column.type):
        raise DataError(f"{where} is {column.type}; allowed: integers 0..C-1 or class names (strings)")
    labels = column.to_numpy().astype(np.int64)
    count = source.num_classes if source.num_classes is not None else int(labels.max()) + 1
    bad = np.flatnonzero((labels < 0) | (labels >= count))
    if bad.size:
        raise DataError(
            f"{where}: label {int(labels[bad[0]])} on row {int(bad[0])} is out of range; allowed: 0 to {count - 1}"
        )
    if count < 2:
        raise DataError(f"{where}: only one class; allowed: at least 2 classes")
    return labels, [str(c) for c in range(count)]


def _parquet_images(column, source: UserSource) -> list[bytes]:
    import pyarrow as pa

    where = f"data.image_column: {source.image_column!r} of {source.path}"
    if pa.types.is_struct(column.type):  # Hugging Face's Image feature: {bytes, path}
        if column.type.get_field_index("bytes") < 0:
            raise DataError(f"{where} is {column.type}; allowed: encoded image bytes, or a struct with 'bytes'")
        column = column.combine_chunks().field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DataError(f"{where} is {column.type}; allowed: encoded image bytes (PNG, JPEG, ...)")
    values = column.to_pylist()
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise DataError(
            f"{where}: row {missing[0]} has no image ({len(missing)} empty); allowed: an image on every row"
        )
    return values
