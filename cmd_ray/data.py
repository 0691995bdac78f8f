"""Data sets with label noise, materialised once as Parquet and read back as tensors.

Raw sources: a built-in data set's reader (`cmd_ray.datasets`, one module each), or a user's
image folder or Parquet file (`cmd_ray.user_data`). Each
(data set, noise spec, seed) is written once to `<root>/cmd-ray-cache/*.parquet` with columns
index, image (raw HWC uint8 bytes), clean_label and noisy_label, and the noise spec, the
realised noise and (for a user's data) the source's identity in the file metadata. Later runs
read the cache. `cmd_ray.batches` cuts what is read into every peer's identical batches.

Clean labels: the built-in data sets have them. A user's data set has them only when cmd-ray
applies the noise (synthetic, or a `noise.labels` file): its own labels are then the
reference. With `noise.type: none` a user's labels *are* the noisy ones, no clean labels
exist (`Split.clean_labels` is None), and the metrics that need them are not computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pyarrow as pa
import torch
from filelock import FileLock

from cmd_ray.console import console
from cmd_ray.datasets import DATA_ROOT, DATASETS, DatasetInfo, load_raw
from cmd_ray.errors import DataError
from cmd_ray.labels_file import ImageKeys
from cmd_ray.noise import NoiseSpec, apply_noise
from cmd_ray.storage import exists, is_uri, join, local, read_parquet, remove, write_parquet_atomic

if TYPE_CHECKING:
    from cmd_ray.user_data import SourceIdentity, UserSource

CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------
# Parquet cache


def cache_key(name: str, spec: NoiseSpec, seed: int, fingerprint: Optional[str] = None) -> str:
    """Stable short key of (data set, noise spec, seed); a matrix or labels file counts by its
    contents, a user's data set by its fingerprint (`UserSource.identity`)."""
    payload = {"dataset": name, "noise": spec.describe(), "seed": seed, "format": CACHE_FORMAT}
    for kind, key in (("matrix", "matrix"), ("labels", "labels")):
        file = getattr(spec, key)
        if spec.type == kind and file:
            path = Path(file).expanduser()
            payload["noise"][key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)
    if fingerprint is not None:
        payload["source"] = fingerprint
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_paths(
    name: str,
    root: str | Path,
    spec: NoiseSpec,
    seed: int,
    source: Optional[UserSource] = None,
    identity: Optional[SourceIdentity] = None,
) -> tuple[str, str]:
    """(train, test) cache files under `<root>/cmd-ray-cache/`: local paths or object-storage URIs.
    A user's `source` is keyed by its `identity` (listed here if not given)."""
    folder = join(root, "cmd-ray-cache")
    tag = spec.tag()
    if source is None:
        key = cache_key(name, spec, seed)
        return join(folder, f"{name}-train-{tag}-seed{seed}-{key}.parquet"), join(folder, f"{name}-test.parquet")
    fingerprint = (identity or source.identity()).fingerprint
    key, source_key = cache_key(name, spec, seed, fingerprint), cache_key(name, NoiseSpec("none"), 0, fingerprint)
    return (
        join(folder, f"{source.tag}-train-{tag}-seed{seed}-{key}.parquet"),
        join(folder, f"{source.tag}-test-{source_key}.parquet"),
    )


def _write_parquet_atomic(
    path: str,
    images: np.ndarray,
    clean: Optional[np.ndarray],
    noisy: np.ndarray,
    meta: dict,
    names: Optional[list[str]] = None,
) -> None:
    """One split as a cache file; `clean` None (no clean labels) is stored as -1 and
    meta["clean_labels"] = False; `names` (a user's image paths) as a `path` column."""
    width = int(np.prod(images.shape[1:]))
    flat = np.ascontiguousarray(images).reshape(len(images), width)
    image_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(flat), [None, pa.py_buffer(flat.tobytes())])
    clean_col = np.full(len(noisy), -1, dtype=np.int64) if clean is None else clean.astype(np.int64)
    table = pa.table(
        {
            "index": pa.array(np.arange(len(flat), dtype=np.int64)),
            "image": image_col,
            "clean_label": pa.array(clean_col),
            "noisy_label": pa.array(noisy.astype(np.int64)),
            **({"path": pa.array(names, pa.string())} if names is not None else {}),
        }
    ).replace_schema_metadata({b"cmd_ray": json.dumps({**meta, "clean_labels": clean is not None}).encode()})
    write_parquet_atomic(path, table)


@dataclass
class Split:
    """One split in memory. images: uint8 (N, C, H, W); labels int64 (N,); clean_labels None
    where none exist (a user's own labels, taken as they are)."""

    images: torch.Tensor
    clean_labels: Optional[torch.Tensor]
    noisy_labels: torch.Tensor
    index: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, positions: torch.Tensor) -> Split:
        return Split(
            self.images[positions],
            None if self.clean_labels is None else self.clean_labels[positions],
            self.noisy_labels[positions],
            self.index[positions],
            self.meta,
        )


def read_parquet_split(path: str | Path) -> Split:
    """Read a cached split (a local file or an object); a missing or corrupt one raises DataError
    naming the path."""
    if not exists(path):
        raise DataError(f"{path}: cache file missing; run `cmd-ray prepare` (or any run) to build it")
    try:
        table = read_parquet(path)
        meta = json.loads(table.schema.metadata[b"cmd_ray"])
        images = table.column("image").combine_chunks()
        if not pa.types.is_fixed_size_binary(images.type):
            raise ValueError("image column is not fixed-size binary")
        height, width, channels = meta["shape"]
        buffer = np.frombuffer(images.buffers()[1], dtype=np.uint8)
        start = images.offset * images.type.byte_width
        array = buffer[start : start + len(images) * images.type.byte_width]
        array = array.reshape(len(images), height, width, channels).transpose(0, 3, 1, 2)
        clean = torch.from_numpy(table.column("clean_label").to_numpy().astype(np.int64))
        split = Split(
            images=torch.from_numpy(np.ascontiguousarray(array)),
            clean_labels=clean if meta.get("clean_labels", True) else None,
            noisy_labels=torch.from_numpy(table.column("noisy_label").to_numpy().astype(np.int64)),
            index=torch.from_numpy(table.column("index").to_numpy().astype(np.int64)),
            meta=meta,
        )
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{path}: cache file is corrupt ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "delete it and rerun to rebuild it"
        ) from None
    if meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{path}: cache format {meta.get('format')} is not {CACHE_FORMAT}; delete it and rerun")
    return split


def read_image_names(path: str) -> Optional[list[str]]:
    """The image paths a user's imported cache holds (its `path` column), or None."""
    table = read_parquet(path)
    return table.column("path").to_pylist() if "path" in table.column_names else None


def materialise(
    name: str,
    root: str | Path,
    spec: NoiseSpec,
    seed: int,
    source: Optional[UserSource] = None,
    require_test: bool = False,
    written: Optional[list[str]] = None,
) -> tuple[str, str]:
    """Write the Parquet cache for (data set, noise spec, seed) if absent; return (train, test) paths.

    `root` may be an object-storage URI: the cache is then written there (the raw files are
    read from this machine: Debian's package, or DATA_ROOT). `source` is a user's data
    set (`data.name` image_folder or parquet); a test cache with no rows means it has no test split,
    refused before anything is written when `require_test`. `written` (a list) gets the cache
    files this call wrote, for a caller that refuses the data afterwards to take them back."""
    if source is None and name not in DATASETS:
        raise DataError(f"data.name: got {name!r}; allowed: one of {', '.join(DATASETS)}")
    identity = source.identity() if source is not None else None  # one listing of the source
    if source is not None and spec.type == "none":
        seed = 0  # the labels as given: the same cache whatever the run's seed
    train_path, test_path = cache_paths(name, root, spec, seed, source, identity)
    if exists(train_path) and exists(test_path):
        return train_path, test_path
    raw_root = local(DATA_ROOT if is_uri(root) else root)
    imported = cache_paths(name, root, NoiseSpec("none"), 0, source, identity)[0] if source is not None else None
    folder = join(root, "cmd-ray-cache")
    files = [p for p in (train_path, test_path, imported) if p is not None]
    existed = {p for p in files if exists(p)} | ({folder} if is_uri(folder) or local(folder).is_dir() else set())
    # Workers of one node may all arrive here at once: one downloads and writes, the rest wait.
    with FileLock(lock_file(raw_root)):
        if not (exists(train_path) and exists(test_path)):
            if source is None:
                _materialise(name, raw_root, spec, seed, train_path, test_path)
            else:
                # A user's images are decoded once per source: into the cache of the labels as
                # given; each noise setting then reads that cache and writes its own labels.
                noisy = (spec, seed, train_path) if train_path != imported else None
                if not exists(imported) or not exists(test_path):
                    _import_user(source, identity, imported, test_path, require_test, noisy)
                elif noisy is not None:
                    _noisy_from_import(imported, *noisy)
    if written is not None:  # the files, then the folder if this call made it
        written += [p for p in (*files, folder) if p not in existed and exists(p)]
    return train_path, test_path


def lock_file(raw_root: Path) -> str:
    """The lock a node's processes take before writing a cache under `raw_root`: in the machine's
    temporary folder, named by the root, so that a run refused while importing leaves nothing in
    the user's folders."""
    import tempfile

    key = hashlib.sha256(str(raw_root.expanduser().resolve()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "cmd-ray-locks"
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):  # shared by every user of the machine, as /tmp is
            folder.chmod(0o1777)
    return str(folder / f"{key}.lock")


def _materialise(name: str, raw_root: Path, spec: NoiseSpec, seed: int, train_path: str, test_path: str) -> None:
    info = DATASETS[name]
    raw = load_raw(name, raw_root)
    base = {"dataset": name, "shape": list(info.shape), "num_classes": info.num_classes, "format": CACHE_FORMAT}
    if not exists(train_path):
        noisy, report = apply_noise(raw["train_labels"], spec, info.num_classes, name, seed)
        meta = {**base, "split": "train", "noise": spec.describe(), "seed": seed, **report.to_dict()}
        _write_noisy(train_path, raw["train_images"], raw["train_labels"], noisy, meta, report.kept)
    if not exists(test_path):
        labels = raw["test_labels"]
        _write_parquet_atomic(test_path, raw["test_images"], labels, labels, {**base, "split": "test"})


UNKNOWN_NOISE = {"asked_matrix": None, "realised_matrix": None, "realised_rate": None}


# The keys of a user's cache file that describe the imported data (the rest describe its labels).
IMPORT_KEYS = ("dataset", "shape", "num_classes", "classes", "mean", "std", "format", "source", "validation_rows")


def _import_user(
    source: UserSource,
    identity: SourceIdentity,
    train_path: str,
    test_path: str,
    require_test: bool,
    noisy: Optional[tuple[NoiseSpec, int, str]] = None,
) -> None:
    """Import a user's data set (decode every image once) into the cache of the labels as given
    (no noise applied) and its test cache; with `noisy` = (spec, seed, path), also that noise
    setting's training cache. The noise is applied before anything is written, so a labels file
    that does not fit the images leaves no cache behind."""
    from cmd_ray.images import channel_stats
    from cmd_ray.user_data import read_user_data

    console(f"[cmd-ray] importing {source.kind} {source.path} into the cache (once) ...")
    started = time.perf_counter()
    raw = read_user_data(source)
    if require_test and raw.test_images is None and raw.validation_rows is None:
        raise no_test_split(source.path)
    mean, std = channel_stats(raw.train_images)
    seconds = time.perf_counter() - started
    base = {
        "dataset": source.kind,
        "shape": list(raw.train_images.shape[1:]),
        "num_classes": len(raw.classes),
        "classes": raw.classes,
        "mean": mean,
        "std": std,
        "format": CACHE_FORMAT,
        **({"validation_rows": raw.validation_rows} if raw.validation_rows else {}),
        "source": {
            "path": source.path,
            "test_path": source.test_path,
            "bytes": raw.source_bytes,
            "modified": identity.modified,
            "sha256": raw.content_sha256,
            "fingerprint": identity.fingerprint,
            "import_seconds": round(seconds, 3),
        },
    }
    train_count, test_count = len(raw.train_labels), 0 if raw.test_labels is None else len(raw.test_labels)
    console(
        f"[cmd-ray] imported {train_count} training and {test_count} test images "
        f"({'x'.join(map(str, base['shape']))}, {len(raw.classes)} classes) in {seconds:.1f} s"
    )
    with_noise = None if noisy is None else _with_noise(raw.train_labels, base, *noisy[:2], raw.train_names)
    # The user's labels are the noisy ones here; no clean labels exist (noise.type none).
    meta = {**base, "split": "train", "noise": NoiseSpec("none").describe(), "seed": 0, **UNKNOWN_NOISE}
    _write_parquet_atomic(train_path, raw.train_images, None, raw.train_labels, meta, raw.train_names)
    if not exists(test_path):
        images = raw.test_images if raw.test_images is not None else raw.train_images[:0]
        labels = raw.test_labels if raw.test_labels is not None else raw.train_labels[:0]
        _write_parquet_atomic(test_path, images, labels, labels, {**base, "split": "test"})
    if with_noise is not None:
        _write_noisy(noisy[2], raw.train_images, raw.train_labels, *with_noise)


def _with_noise(
    labels: np.ndarray, base: dict, spec: NoiseSpec, seed: int, names: Optional[list[str]]
) -> tuple[np.ndarray, dict, Optional[np.ndarray]]:
    """(noisy labels, cache metadata, positions kept or None = all) of a noise setting over the
    labels as given, which become the clean reference. A labels file is joined to the images by
    their `names` (paths relative to data.path) where it names images; one that leaves images out
    (noise.labels_coverage: listed) keeps the others, and their own validation rows follow them."""
    keys = ImageKeys.of_folder(names, base.get("classes"), base.get("source", {}).get("path"))
    noisy, report = apply_noise(labels, spec, base["num_classes"], base["dataset"], seed, keys)
    meta = {**base, "split": "train", "noise": spec.describe(), "seed": seed, **report.to_dict()}
    if report.kept is not None and "validation_rows" in base:
        position = {int(old): new for new, old in enumerate(report.kept)}
        rows = [position[row] for row in base["validation_rows"] if row in position]
        meta.pop("validation_rows")
        meta.update({"validation_rows": rows} if rows else {})
    return noisy, meta, report.kept


def _write_noisy(
    path: str, images: np.ndarray, labels: np.ndarray, noisy: np.ndarray, meta: dict, kept: Optional[np.ndarray]
) -> None:
    """A noise setting's training cache: the images kept, their labels as given (the clean
    reference) and their noisy labels."""
    if kept is not None:
        images, labels = images[kept], labels[kept]
    _write_parquet_atomic(path, images, labels, noisy, meta)


def _noisy_from_import(imported: str, spec: NoiseSpec, seed: int, train_path: str) -> None:
    """A noise setting's training cache from the imported one, without decoding any image."""
    split = read_parquet_split(imported)
    base = {key: split.meta[key] for key in IMPORT_KEYS if key in split.meta}
    labels = split.noisy_labels.numpy()  # the labels as given
    with_noise = _with_noise(labels, base, spec, seed, read_image_names(imported))
    images = split.images.permute(0, 2, 3, 1).numpy()  # back to the cache's (N, H, W, C)
    _write_noisy(train_path, images, labels, *with_noise)


def no_test_split(where: str) -> DataError:
    return DataError(
        f"data.validation_fraction: got 0, but {where} has no test split; allowed: a share in (0, 0.5] "
        "held out as the noisy validation split that is then reported (or give a test split)"
    )


def dataset_info(meta: dict) -> DatasetInfo:
    """A cache file's data set: a built-in's entry (`cmd_ray.datasets`), or what a user's import measured."""
    if meta["dataset"] in DATASETS:
        entry = DATASETS[meta["dataset"]]
        return DatasetInfo(entry.num_classes, entry.shape, entry.mean, entry.std)
    return DatasetInfo(meta["num_classes"], tuple(meta["shape"]), tuple(meta["mean"]), tuple(meta["std"]))


@dataclass
class DataBundle:
    """What a run trains and evaluates on."""

    train: Split
    test: Optional[Split]  # None: a user's data set without a test split (validation is the headline)
    info: DatasetInfo
    noise: dict  # realised rate, asked and realised matrices, spec
    validation: Optional[Split] = None  # held out from the noisy training set (noisy labels)


def load_data(
    name: str,
    root: str | Path,
    spec: NoiseSpec,
    seed: int,
    train_subset: Optional[int] = None,
    test_subset: Optional[int] = None,
    validation_fraction: float = 0.0,
    source: Optional[UserSource] = None,
) -> DataBundle:
    """Materialise (once) and read the noisy train split and the test split.

    `train_subset` keeps a seeded random subset of the training set; `test_subset` the first
    N test images (smoke tests only: reported accuracy is then not on the full test set).
    `validation_fraction` moves a seeded share of the (subset) training set, noisy labels
    and all, into `validation`; the peers do not train on it. `source`: a user's data set.
    """
    written: list[str] = []
    train_path, test_path = materialise(name, root, spec, seed, source, validation_fraction == 0, written)
    try:
        return _bundle(train_path, test_path, name, seed, train_subset, test_subset, validation_fraction, source)
    except DataError:  # refused after the import: a refused run leaves no cache of its own behind
        for path in written:
            remove(path)
        raise


def _bundle(
    train_path: str,
    test_path: str,
    name: str,
    seed: int,
    train_subset: Optional[int],
    test_subset: Optional[int],
    validation_fraction: float,
    source: Optional[UserSource],
) -> DataBundle:
    """A run's splits from its cache files: the subset, the validation split, the realised noise."""
    train, test = read_parquet_split(train_path), read_parquet_split(test_path)
    given = train.meta.get("validation_rows")  # a user's own validation rows
    if given and validation_fraction > 0:
        raise DataError(
            f"data.validation_fraction: got {validation_fraction:g}, but {source.path if source else name} has "
            f"{len(given)} validation rows of its own; allowed: 0 (those rows are the validation split)"
        )
    if len(test) == 0:
        if validation_fraction == 0 and not given:
            raise no_test_split(source.path if source else name)
        test = None
    own_validation = None
    if given:
        held = torch.zeros(len(train), dtype=torch.bool)
        held[torch.tensor(given)] = True
        train, own_validation = (
            train.subset(torch.nonzero(~held).flatten()),
            train.subset(torch.nonzero(held).flatten()),
        )
    if train_subset is not None and train_subset > len(train):
        # Trained on all of them, the run's config (and every results row) would say otherwise.
        raise DataError(
            f"data.train_subset: got {train_subset}, but {source.path if source else name} has {len(train)} "
            f"training images; allowed: an integer up to {len(train)}, or null (all of them)"
        )
    subset = train_subset is not None and train_subset < len(train)
    if subset:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:train_subset]
        train = train.subset(torch.sort(keep).values)
    if test is not None and test_subset is not None and test_subset < len(test):
        test = test.subset(torch.arange(test_subset))
    train, validation = split_validation(train, validation_fraction, seed)
    if validation is not None:
        check_every_class_trains(train, validation, validation_fraction)
    validation = own_validation if own_validation is not None else validation
    noise = {k: train.meta[k] for k in ("noise", "realised_rate", "asked_matrix", "realised_matrix")}
    if "left_out" in train.meta:  # images a labels file does not name, not trained on
        noise["left_out"] = train.meta["left_out"]
    # The rate among the samples trained on, where that is not the whole cached set (a subset or
    # a validation split was taken); null otherwise (realised_rate is it) or without clean labels.
    noise["subset_realised_rate"] = (
        None
        if train.clean_labels is None or not (subset or validation is not None)
        else float((train.noisy_labels != train.clean_labels).float().mean())
    )
    info = dataset_info(train.meta)
    return DataBundle(train=train, test=test, info=info, noise=noise, validation=validation)


def check_every_class_trains(train: Split, validation: Split, fraction: float) -> None:
    """Refuse a validation split that holds every image of a class (by the labels trained on):
    the peers would never see the class, and its accuracy would say nothing (DataError)."""
    held = torch.bincount(validation.noisy_labels)
    kept = torch.bincount(train.noisy_labels, minlength=len(held))
    lost = [c for c in range(len(held)) if held[c] > 0 and kept[c] == 0]
    if lost:
        classes = train.meta.get("classes")
        name = repr(classes[lost[0]]) if classes else str(lost[0])
        raise DataError(
            f"data.validation_fraction: got {fraction:g}, but class {name} has {int(held[lost[0]])} image(s), all held "
            "out for validation; allowed: a smaller share, or more images of that class"
        )


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Optional[Split]]:
    """(train without the held-out rows, held-out rows) — a seeded `fraction` of `train`, or None."""
    count = int(round(fraction * len(train)))
    if count == 0:
        return train, None
    if count >= len(train):
        raise DataError(f"data.validation_fraction: {fraction} leaves no training images out of {len(train)}")
    # A generator of its own so the split does not shift the subset or the batch order.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 104_729))
    held_out, kept = torch.sort(order[:count]).values, torch.sort(order[count:]).values
    return train.subset(kept), train.subset(held_out)
