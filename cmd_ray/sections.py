"""The config's sections that are not a method's: every key a user can set for the data, the
label noise, the networks, the optimiser, Ray, sweeps, W&B and the test hooks, each a field
with its default and a comment. `cmd_ray.config` assembles them, with each method's section
(`cmd_ray.methods`), into one `Config` and checks it. Nothing here imports torch or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from cmd_ray.catalogue import DATA_NAMES, MODELS, NOISE_TYPES
from cmd_ray.datasets import DATA_ROOT


@dataclass
class DataConfig:
    # A built-in data set, or your own: image_folder (one sub-folder per class) | parquet (a file
    # of encoded images and labels). See the README, "Your own noisy data".
    name: Literal[DATA_NAMES] = "fashion-mnist"
    # Where raw data is looked for / downloaded, and where the Parquet cache is written.
    root: str = DATA_ROOT
    # Your own data: the training image folder, or the Parquet file (local or s3://...).
    path: Optional[str] = None
    # image_folder only: a test folder with the same class sub-folders (null = no test split).
    test_path: Optional[str] = None
    # Your own data: resize every image to this square side on import (null = keep the size; the
    # images must then all be square and of one size).
    image_size: Optional[int] = None
    # parquet only: the column of encoded images (bytes, or a {bytes, path} struct), the label
    # column (integers 0..C-1 or class names) and an optional split column (train / test).
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"
    # parquet with integer labels: the class count C (null = the largest label + 1).
    num_classes: Optional[int] = None
    # parquet: the column naming each image (a path or id) that a labels file's paths are matched
    # against; null = a column named path, file, filename or id if there is one, else the image
    # struct's own `path` field where every row has one.
    path_column: Optional[str] = None
    # Train on a seeded random subset of this many training images (None = all of them).
    train_subset: Optional[int] = None
    # Evaluate on the first N test images (None = the full clean test set; use for smoke tests only).
    test_subset: Optional[int] = None
    # Hold out this fraction of the (noisy) training set for choosing hyper-parameters: the peers
    # never train on it, and accuracy against its *noisy* labels is reported each epoch as
    # val_accuracy. 0 = no validation split. Choose settings on this, never on the test set.
    # Your own data without a test split needs it: val_accuracy is then the headline.
    validation_fraction: float = 0.0
    # Random crop + horizontal flip. auto: CIFAR's recipe (crop padded 4 px + flip) for CIFAR-10/100,
    # off for Fashion-MNIST and for your own data. on: that recipe for CIFAR, else a crop padded by
    # an eighth of the image side, no flip. off: none.
    augment: Literal["auto", "on", "off"] = "auto"
    # Horizontal flips when augmenting: null = as `augment` says; true/false to choose (flips are
    # wrong for digits, text and anything with a handedness).
    flip: Optional[bool] = None


# The noise keys each noise type reads besides `type` (the others: "rate").
NOISE_READS = {"none": (), "matrix": ("matrix",), "labels": ("labels", "labels_key", "labels_coverage")}


@dataclass
class NoiseConfig:
    # none | symmetric (to one of the C-1 other classes, uniformly) | pairflip (y -> y+1 mod C)
    # | asymmetric (documented class map per built-in data set) | matrix (a user's C x C file)
    # | labels (a file of real noisy labels, one per training image, e.g. CIFAR-10N's).
    # With your own data, `none` trains on your labels as they are (no clean labels exist); any
    # other type takes your labels as the clean reference and measures the noise against them.
    type: Literal[NOISE_TYPES] = "symmetric"
    # Flip probability r in [0, 1]; ignored for none, matrix and labels.
    rate: float = 0.4
    # Path to a C x C row-stochastic matrix (.npy, .csv or .txt) when type = matrix.
    matrix: Optional[str] = None
    # The noisy labels when type = labels: by image path (a .csv with a path column, or `path
    # label` lines in a .txt, as Clothing1M ships them), or one per image in the data set's order
    # (.npy, a one-column .csv or .txt, or a .pt dictionary). Labels: class names or integers.
    labels: Optional[str] = None
    # The .pt dictionary's entry, e.g. worse_label, aggre_label, random_label1 (CIFAR-10N).
    labels_key: Optional[str] = None
    # A labels file by path: all = it must name every training image (else refused); listed =
    # train on the images it names and leave the rest out (e.g. Clothing1M's noisy subset).
    labels_coverage: Literal["all", "listed"] = "all"

    def reads(self) -> tuple[str, ...]:
        """The keys of this section its type reads besides `type`: a rate, a matrix file, a
        labels file (tables, W&B and show-config show only these: a rate nobody asked for is none)."""
        return NOISE_READS.get(self.type, ("rate",))

    def describe(self) -> dict:
        """The settings that define this noise (what cache files are keyed by): no rate or file
        where the type asks for none."""
        if self.type == "none":
            return {"type": self.type}
        if self.type == "labels":  # a file of labels: no rate, no matrix is asked for
            coverage = {"labels_coverage": self.labels_coverage} if self.labels_coverage != "all" else {}
            return {"type": self.type, "labels": self.labels, "labels_key": self.labels_key, **coverage}
        return {"type": self.type, "rate": self.rate, "matrix": self.matrix}

    def tag(self) -> str:
        """A readable part of cache file names and report rows: 'symmetric-0.4', 'clean',
        'matrix-<file stem>', 'labels-<file stem>[-<key>]' (no rate where none is asked for)."""
        if self.type == "none":
            return "clean"
        if self.type in ("matrix", "labels"):
            file = self.matrix if self.type == "matrix" else self.labels
            parts = [
                self.type,
                Path(file or "none").stem,
                *([self.labels_key] if self.type == "labels" and self.labels_key else []),
            ]
            return "-".join("".join(c if c.isalnum() or c in "_.-" else "_" for c in p) for p in parts)[:60]
        return f"{self.type}-{self.rate:g}"


@dataclass
class ModelConfig:
    # Architecture of every peer: small_cnn (28x28 inputs) | mlp (any) | preact_resnet18 (32x32).
    name: Literal[MODELS] = "small_cnn"
    # Optional architecture per peer (length = peers); overrides `name` where given.
    per_peer: Optional[list[str]] = None


@dataclass
class OptimConfig:
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    # Learning-rate schedule over all steps: constant | cosine (to 0 at the last step).
    schedule: Literal["constant", "cosine"] = "cosine"


@dataclass
class RayConfig:
    # Cluster to join: null = a local embedded Ray (or $RAY_ADDRESS if set); "auto" = running cluster.
    address: Optional[str] = None
    # Logical CPUs of the embedded local Ray (null = this machine's cores); ignored on a cluster.
    num_cpus: Optional[float] = None
    # CPUs each peer worker reserves; null = 1, or on a local Ray with fewer cores than workers, an even share.
    cpus_per_worker: Optional[float] = None
    # GPUs each worker reserves when use_gpu: 1 = a GPU per peer; 0.5 = two peers share one GPU.
    gpus_per_worker: float = 1.0
    # Restart the worker group from the latest checkpoint up to this many times (-1 = forever).
    max_failures: int = 1
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always checkpoints)
    checkpoints_to_keep: int = 2
    # Level of Ray Train's own logs on the console (per-report INFO lines are noise for most runs).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # Where Ray Train keeps run state and checkpoints (null = <output_dir>/ray); shared storage on a cluster.
    storage_path: Optional[str] = None


@dataclass
class TestingConfig:
    """Hooks for tests; leave at the defaults for real runs."""

    trace_dir: Optional[str] = None  # write each peer's per-step loss and selection mask here
    crash_epoch: Optional[int] = None  # kill one worker process once, in this epoch (0-based) ...
    crash_step: int = 0  # ... at this step ...
    crash_rank: int = 1  # ... the worker of this world rank
    # exit: the process exits at once; hang: it stops there (writing the same marker file) until
    # something outside kills it, e.g. a test removing its node (an event, not a time window).
    crash_mode: Literal["exit", "hang"] = "exit"
    nan_step: Optional[int] = None  # make peer `nan_peer`'s logits NaN at this global step (0-based)
    nan_peer: int = 1
    measure_wait: bool = False  # time waiting on the slower peer apart from the exchange (one more collective)
    step_sleep: float = 0.0  # seconds to sleep after each step: slows a tiny run so a test can act mid-run


@dataclass
class WandbConfig:
    # auto: online when an API key is configured (WANDB_API_KEY or `wandb login`), else offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "cmd-ray"
    entity: Optional[str] = None  # team or user; null = the key's default


@dataclass
class SweepConfig:
    """A Ray Tune grid over this config: every combination of the grid's values is a trial."""

    name: str = "sweep"
    # Dotted config key -> list of values, e.g. {"noise.rate": [0.2, 0.5], "method": ["ce", "cmd-p"]}.
    grid: dict[str, list] = field(default_factory=dict)
    storage_path: str = "runs/sweeps"  # the sweep writes <storage_path>/<name>/
    # Trials at once; null = as many as the cluster's CPUs (or GPUs) hold.
    max_concurrent_trials: Optional[int] = None
    # Where a trial's peers run. workers: a Ray Train run, each peer its own worker (its own GPU
    # or node; needed for replicas > 1). trial: all peers in the Tune trial's process, stepped
    # by the in-process trainer (same peer step), trials packed by cpus_per_trial /
    # gpus_per_trial and trial processes reused: the fast path for small models. auto: workers
    # when replicas > 1 or each peer asks for a whole GPU, else trial.
    placement: Literal["auto", "workers", "trial"] = "auto"
    cpus_per_trial: float = 1.0  # placement trial: CPUs a trial reserves (its torch threads)
    gpus_per_trial: float = 1.0  # placement trial with use_gpu: GPUs a trial's peers share (0.25 = 4 trials a GPU)
    wandb: WandbConfig = field(default_factory=WandbConfig)
