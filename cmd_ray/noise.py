"""Synthetic label noise: transition matrices, seeded corruption and the realised noise.

A noise model is a C x C row-stochastic matrix T with T[i, j] = P(noisy = j | clean = i):
rows are the clean class and each row sums to 1 (a `noise.matrix` file must follow this
convention). cleanlab's `noise_matrix` is the transpose, P(noisy = i | clean = j), whose
columns sum to 1. Labels are corrupted once, with a seed, by sampling each noisy label from
the row of its clean label. Real noisy labels (`labels`: a file of labels, by image path or
in the data set's order, e.g. CIFAR-10N's human annotations; read and joined by
`cmd_ray.labels_file`) replace the labels instead, and the realised matrix is measured against
the clean ones. Pure NumPy; torch only to read a `.pt` file.

Asymmetric noise flips each clean class to a similar one with probability r, by the data
set's own class map (its entry's `asymmetric`, in `cmd_ray/datasets/`): T-shirt <-> shirt on
Fashion-MNIST, cat <-> dog on CIFAR-10 (Patrini et al. 2017), a fine class to the next of its
super-class on CIFAR-100.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cmd_ray.catalogue import NOISE_TYPES
from cmd_ray.config import Config, NoiseConfig
from cmd_ray.datasets import DATASETS
from cmd_ray.errors import NoiseError
from cmd_ray.labels_file import LABEL_FILE_SUFFIXES, ImageKeys, join_labels, read_labels_file

# What noise to apply is the config's own `noise` section: type, rate, for `matrix` the file
# holding T, for `labels` the file of noisy labels (and, for a `.pt` dictionary, its key).
NoiseSpec = NoiseConfig


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise NoiseError(f"noise.rate: got {rate!r}; allowed: a number in [0, 1]")


def symmetric_matrix(rate: float, num_classes: int) -> np.ndarray:
    """Flip with probability `rate` to one of the C-1 *other* classes, uniformly. Shape (C, C)."""
    _check_rate(rate)
    if num_classes < 2:
        raise NoiseError(
            f"noise.type: 'symmetric' needs at least 2 classes to flip between; the data have {num_classes}"
        )
    off = rate / (num_classes - 1)
    matrix = np.full((num_classes, num_classes), off)
    np.fill_diagonal(matrix, 1.0 - rate)
    return matrix


def pairflip_matrix(rate: float, num_classes: int) -> np.ndarray:
    """Flip y -> (y + 1) mod C with probability `rate` (Co-teaching's pair noise). Shape (C, C)."""
    _check_rate(rate)
    matrix = np.eye(num_classes) * (1.0 - rate)
    for c in range(num_classes):
        matrix[c, (c + 1) % num_classes] += rate
    return matrix


def asymmetric_matrix(rate: float, dataset: str) -> np.ndarray:
    """Class-dependent flips between similar classes, from the data set's documented map."""
    _check_rate(rate)
    if not (dataset in DATASETS and DATASETS[dataset].asymmetric):
        mapped = [name for name, entry in DATASETS.items() if entry.asymmetric]
        raise NoiseError(
            f"noise.type: 'asymmetric' has no class map for data set {dataset!r}; "
            f"allowed data sets: {', '.join(mapped)}"
        )
    flips = DATASETS[dataset].asymmetric
    num_classes = DATASETS[dataset].num_classes
    matrix = np.eye(num_classes)
    for src, dst in flips.items():
        matrix[src, src] = 1.0 - rate
        matrix[src, dst] = rate
    return matrix


def check_matrix(matrix: np.ndarray, num_classes: int, name: str = "noise.matrix") -> np.ndarray:
    """Return `matrix` as float64 if it is C x C, finite, non-negative with rows summing to 1."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (num_classes, num_classes):
        raise NoiseError(
            f"{name}: got shape {tuple(matrix.shape)}; "
            f"allowed: ({num_classes}, {num_classes}) for {num_classes} classes"
        )
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise NoiseError(f"{name}: has negative or non-finite entries; allowed: entries >= 0")
    sums = matrix.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
    if bad.size:
        raise NoiseError(f"{name}: row {int(bad[0])} sums to {sums[bad[0]]:.6g}; allowed: every row sums to 1")
    return matrix


def check_noise_files(cfg: Config) -> None:
    """Before any work: the files the run's noise reads are there and fit — a `matrix` file is
    readable and C x C (C of a built-in data set; a user's is known once the data are read, so
    the file's own shape for now), a `labels` file exists with a suffix read here (its labels are
    checked against the images when those are read). NoiseError naming the field otherwise.

    Not part of config validation: a Ray worker rebuilds the run's config on a node that may not
    hold these files, and a sweep's report rebuilds it long after."""
    if cfg.noise.type == "matrix" and cfg.noise.matrix:
        own = cfg.data.name not in DATASETS
        read_matrix_file(cfg.noise.matrix, None if own else DATASETS[cfg.data.name].num_classes)
    if cfg.noise.type == "labels":
        check_labels_file(cfg.noise.labels, cfg.noise.labels_coverage)


def check_labels_file(path: Optional[str], coverage: str = "all") -> None:
    """Before any work, for noise.type labels: the file exists, has a suffix cmd-ray reads, and a
    text file (.csv, .txt) reads as labels (its labels are joined to the images once those are
    read; a .pt file is read then, which needs torch)."""
    if not path or Path(path).suffix not in LABEL_FILE_SUFFIXES or not Path(path).expanduser().is_file():
        raise NoiseError(
            f"noise.labels: got {path!r}; allowed with noise.type 'labels': an existing "
            f"{', '.join(LABEL_FILE_SUFFIXES)} file"
        )
    if Path(path).suffix in (".csv", ".txt"):
        found = read_labels_file(path)
        if coverage != "all" and not found.keyed:
            raise NoiseError(
                f"noise.labels_coverage: got {coverage!r}, but {found.file} names no image paths (its labels "
                "follow the data set's order); allowed: 'all'"
            )


def read_matrix_file(path: str | Path, num_classes: Optional[int]) -> np.ndarray:
    """Read a transition matrix from .npy, or from text (.csv: commas, .txt: whitespace);
    `num_classes` None takes C from the file (a user's data set, before its import)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NoiseError(f"noise.matrix: file {path} does not exist; allowed: a .npy, .csv or .txt file")
    try:
        if path.suffix == ".npy":
            matrix = np.load(path, allow_pickle=False)
        else:
            matrix = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
    except (ValueError, OSError) as err:
        raise NoiseError(f"noise.matrix: cannot read {path} as a matrix: {str(err).splitlines()[0]}") from None
    return check_matrix(matrix, len(matrix) if num_classes is None else num_classes)


def transition_matrix(spec: NoiseSpec, num_classes: int, dataset: str) -> np.ndarray:
    """The C x C matrix T the spec asks for; T[i, j] = P(noisy = j | clean = i)."""
    if spec.type == "none":
        return np.eye(num_classes)
    if spec.type == "symmetric":
        return symmetric_matrix(spec.rate, num_classes)
    if spec.type == "pairflip":
        return pairflip_matrix(spec.rate, num_classes)
    if spec.type == "asymmetric":
        return asymmetric_matrix(spec.rate, dataset)
    if spec.type == "matrix":
        if not spec.matrix:
            raise NoiseError("noise.matrix: got null; allowed: a path to a C x C matrix file")
        return read_matrix_file(spec.matrix, num_classes)
    raise NoiseError(f"noise.type: got {spec.type!r}; allowed: one of {', '.join(NOISE_TYPES)}")


def expected_flip_rate(spec: NoiseSpec, num_classes: Optional[int], dataset: str) -> float:
    """The share of labels the noise model flips with balanced classes: 1 - mean_i T[i, i].

    noise.rate for symmetric and pair-flip, rate x (mapped classes / C) for asymmetric, 0 for
    none. A labels file has no model: its rate is unknown to training (measuring it would read
    the clean labels), so asking raises NoiseError.
    """
    if spec.type == "labels":
        raise NoiseError(
            "coteaching.forget_rate: got null; allowed with noise.type 'labels': a number in [0, 1], "
            "your estimate of the share of wrong labels"
        )
    if spec.type in ("symmetric", "pairflip"):
        return float(spec.rate)
    if spec.type == "matrix":
        return float(1.0 - np.diag(read_matrix_file(spec.matrix, num_classes)).mean())
    return float(1.0 - np.diag(transition_matrix(spec, num_classes, dataset)).mean())


def corrupt_labels(clean: np.ndarray, matrix: np.ndarray, seed: int) -> np.ndarray:
    """Sample noisy[i] ~ matrix[clean[i]] with a seeded generator. Shape (N,), int64."""
    clean = np.asarray(clean, dtype=np.int64)
    matrix = check_matrix(matrix, matrix.shape[0])
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(matrix, axis=1)
    cumulative[:, -1] = 1.0  # guard against rounding leaving a gap at the top
    u = rng.random(clean.shape[0])
    return (u[:, None] > cumulative[clean]).sum(axis=1).astype(np.int64)


def realised_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Empirical T: row i is the distribution of noisy labels among samples of clean class i."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (np.asarray(clean), np.asarray(noisy)), 1)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


@dataclass
class NoiseReport:
    """What the corruption did: asked-for matrix, realised matrix and overall flip rate; for a
    labels file that names only some images (noise.labels_coverage: listed), the positions of the
    images kept and how many were left out."""

    asked: np.ndarray
    realised: np.ndarray
    realised_rate: float
    kept: Optional[np.ndarray] = None  # positions of the images trained on; None = all
    left_out: int = 0

    def to_dict(self) -> dict:
        out = {
            "asked_matrix": self.asked.round(6).tolist(),
            "realised_matrix": self.realised.round(6).tolist(),
            "realised_rate": self.realised_rate,
        }
        return out | ({"left_out": self.left_out} if self.kept is not None else {})


def apply_noise(
    clean: np.ndarray,
    spec: NoiseSpec,
    num_classes: int,
    dataset: str,
    seed: int,
    images: Optional[ImageKeys] = None,
) -> tuple[np.ndarray, NoiseReport]:
    """Corrupt `clean` labels (shape (N,)) under `spec`, or read them from a labels file joined to
    the images by path or position (`images`: the data set's image paths and class names); return
    the noisy labels of the images kept (all N, unless the file leaves some out: `report.kept`)
    and a report (a labels file asked for no matrix: `asked` is the realised one)."""
    kept = None
    if spec.type == "labels":
        found = read_labels_file(spec.labels, spec.labels_key)
        noisy, kept = join_labels(found, len(clean), num_classes, images or ImageKeys(), spec.labels_coverage)
        matrix = None
    else:
        matrix = transition_matrix(spec, num_classes, dataset)
        noisy = corrupt_labels(clean, matrix, seed)
    reference = np.asarray(clean) if kept is None else np.asarray(clean)[kept]
    realised = realised_matrix(reference, noisy, num_classes)
    report = NoiseReport(
        asked=realised if matrix is None else matrix,
        realised=realised,
        realised_rate=float(np.mean(noisy != reference)) if len(reference) else 0.0,
        kept=kept,
        left_out=0 if kept is None else len(clean) - len(kept),
    )
    return noisy, report
