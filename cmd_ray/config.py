"""One validated configuration for a CMD run: YAML presets, `--set a.b=value` overrides, checks.

Every key a user can set is a field below, with its default and a comment. Values are
checked before any work starts; a bad value raises `ConfigError` whose message is one line
naming the field, the value and what is allowed. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from cmd_ray import methods
from cmd_ray.catalogue import DATA_NAMES, MODEL_INPUT_SIZE, MODELS, NOISE_TYPES, USER_DATASETS, model_fit_error
from cmd_ray.datasets import DATA_ROOT, DATASETS
from cmd_ray.errors import ConfigError, check_above, check_positive, check_range
from cmd_ray.storage import is_uri, local

METHODS = methods.NAMES


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


@dataclass
class _RunSettings:
    # Method by name, one of cmd_ray.methods.NAMES: ce (zero knowledge) | dml (all knowledge) |
    # coteaching | coteaching+ | jocor | cmd-s | cmd-p (`cmd-ray methods` lists them). Their settings
    # are the methods' sections: knowledge, distill, labels (CMD), coteaching (the small-loss
    # schedule), coteaching_plus, jocor; each defined, with its defaults, in cmd_ray/methods/.
    method: Literal[METHODS] = "cmd-p"
    peers: int = 2  # P >= 2 peer networks
    replicas: int = 1  # D data-parallel replicas per peer (Ray path)
    epochs: int = 5
    batch_size: int = 128  # global batch; every peer sees the same one
    seed: int = 0  # seeds noise, subset, batch order, initial weights
    use_gpu: bool = False
    # Numerics of the forward pass: fp32 | bf16 (autocast; meant for GPUs, losses stay fp32).
    precision: Literal["fp32", "bf16"] = "fp32"
    # Where run outputs (summaries, checkpoints) go.
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # (each registered method's section is inserted here: cmd_ray.methods.SECTIONS)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)


class _ConfigBehaviour:
    """What a Config can say about itself beyond its fields."""

    @property
    def placement(self) -> str:
        """Where a sweep trial's peers run: `sweep.placement` with auto decided (workers | trial)."""
        if self.sweep.placement != "auto":
            return self.sweep.placement
        whole_gpu_per_peer = self.use_gpu and self.ray.gpus_per_worker >= 1
        return "workers" if self.replicas > 1 or whole_gpu_per_peer else "trial"

    @property
    def workers(self) -> int:
        """Ray Train workers of a run: every peer's data-parallel replicas."""
        return self.peers * self.replicas

    def joins_cluster(self) -> bool:
        """Whether a Ray run joins a running cluster (ray.address or $RAY_ADDRESS) rather than
        starting a local embedded Ray."""
        return bool(self.ray.address or os.environ.get("RAY_ADDRESS"))

    def peer_models(self) -> list[str]:
        """Architecture name of each peer, length `peers`."""
        return list(self.model.per_peer) if self.model.per_peer else [self.model.name] * self.peers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_used_dict(self) -> dict[str, Any]:
        """`to_dict` with the noise section cut to what its type reads (what show-config and a
        sweep's W&B runs show; `to_dict` keeps every key, for rebuilding the config)."""
        values = self.to_dict()
        values["noise"] = {k: v for k, v in values["noise"].items() if k == "type" or k in self.noise.reads()}
        return values


def _assemble_config() -> type:
    """Config = the run settings with every registered method's section inserted before `ray`, so
    that adding a method (cmd_ray/methods/) adds its section without an edit here."""
    settings = [(f.name, f.type, f) for f in dataclasses.fields(_RunSettings)]
    at = next(i for i, (name, _, _) in enumerate(settings) if name == "ray")
    sections = [(key, section, field(default_factory=section)) for key, section in methods.SECTIONS.items()]
    cls = dataclasses.make_dataclass("Config", settings[:at] + sections + settings[at:], bases=(_ConfigBehaviour,))
    cls.__module__, cls.__qualname__ = __name__, "Config"
    cls.__doc__ = "One run's configuration: the run settings above and each method's section (cmd_ray.methods)."
    return cls


Config = _assemble_config()


# --------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checks that name the field.


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of dotted config keys to lists of values"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


# YAML 1.1 (PyYAML, in files and in --set) reads these words as booleans.
_YAML_TRUE, _YAML_FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")


def _yaml_word(value: bool, allowed: tuple) -> Any:
    """The allowed value a YAML boolean was typed as: `augment: off` reaches us as False, and
    means 'off' where 'off' is an allowed value (else the boolean, refused by the caller)."""
    words = _YAML_TRUE if value else _YAML_FALSE
    matches = [a for a in allowed if isinstance(a, str) and a.lower() in words]
    return matches[0] if len(matches) == 1 else value


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}: got {value!r}; allowed: {_describe(tp)}")
    if origin is Union:
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is Literal:
        if isinstance(value, bool):
            value = _yaml_word(value, typing.get_args(tp))
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        for key, values in value.items():
            if not isinstance(key, str) or not isinstance(values, list) or not values:
                raise ConfigError(f"{name}.{key}: got {values!r}; allowed: a non-empty list of values")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported field type {tp!r} for {name}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key; allowed at this level: {', '.join(sorted(known))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, tp, name = values[f.name], hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: got {value!r}; allowed: a mapping of its keys")
            kwargs[f.name] = _build(tp, value, prefix=f"{name}.")
        else:
            kwargs[f.name] = _coerce(name, value, tp)
    return cls(**kwargs)


def _check_run_shape(cfg: Config) -> None:
    """Peers, replicas, epochs, batch and subset sizes, seed."""
    if cfg.peers < 2:
        raise ConfigError(f"peers: got {cfg.peers}; allowed: an integer >= 2 (CMD needs at least two peer networks)")
    for name, value in (
        ("replicas", cfg.replicas),
        ("epochs", cfg.epochs),
        ("batch_size", cfg.batch_size),
        ("data.train_subset", cfg.data.train_subset),
        ("data.test_subset", cfg.data.test_subset),
    ):
        check_positive(name, value)
    if cfg.seed < 0:
        raise ConfigError(f"seed: got {cfg.seed}; allowed: an integer >= 0")
    check_range("data.validation_fraction", cfg.data.validation_fraction, 0.0, 0.5)


def _check_method(cfg: Config) -> None:
    """Noise rate, thresholds, distillation, small-loss rule and optimiser."""
    check_range("noise.rate", cfg.noise.rate, 0.0, 1.0)
    if cfg.noise.type == "matrix" and not cfg.noise.matrix:
        raise ConfigError("noise.matrix: got null; allowed: a path to a C x C matrix file when noise.type is 'matrix'")
    for method in methods.REGISTRY.values():  # every section's ranges, whichever method reads it
        method.check_sections(cfg)
    if not grid_sets_method(cfg):  # else each grid point's method is checked with that point
        methods.get(cfg.method).check(cfg)
    check_above("optim.lr", cfg.optim.lr, 0)
    check_above("optim.weight_decay", cfg.optim.weight_decay, 0, inclusive=True)
    check_range("optim.momentum", cfg.optim.momentum, 0.0, 1.0)


def check_models_fit(cfg: Config, image_size: int, images: str) -> None:
    """Every peer's architecture takes square images of side `image_size` (`images` names them
    in the message); raise ConfigError naming model.name or model.per_peer[i] if one does not.
    For a user's data, whose images are resized at import when asked, the message says how."""
    for i, name in enumerate(cfg.model.per_peer or [cfg.model.name]):
        problem = model_fit_error(name, image_size, images) if name in MODELS else None
        if problem:
            takes = MODEL_INPUT_SIZE[name]
            if cfg.data.name in USER_DATASETS and cfg.data.image_size is None:
                problem += f"; or set data.image_size: {takes} to resize the images at import"
            raise ConfigError(f"{f'model.per_peer[{i}]' if cfg.model.per_peer else 'model.name'}: {problem}")


def _check_models_and_data(cfg: Config) -> None:
    """Each peer's architecture fits the images (the noise files are checked by
    `cmd_ray.noise.check_noise_files`, beside their readers)."""
    own = cfg.data.name in USER_DATASETS
    size = cfg.data.image_size if own else DATASETS[cfg.data.name].shape[0]
    if size:  # a user's images without data.image_size are checked once imported
        check_models_fit(cfg, size, cfg.data.name)
    if cfg.model.per_peer is not None:
        if len(cfg.model.per_peer) != cfg.peers:
            raise ConfigError(
                f"model.per_peer: got {len(cfg.model.per_peer)} names; allowed: exactly peers={cfg.peers} names"
            )
        for i, name in enumerate(cfg.model.per_peer):
            if name not in MODELS:
                raise ConfigError(f"model.per_peer[{i}]: got {name!r}; allowed: one of {', '.join(MODELS)}")


# The data.* keys only a user's data set reads, and the layouts that read them.
OWN_DATA_KEYS = {
    "path": USER_DATASETS,
    "image_size": USER_DATASETS,
    "test_path": USER_DATASETS,
    "image_column": ("parquet",),
    "label_column": ("parquet",),
    "split_column": ("parquet",),
    "num_classes": ("parquet",),
    "path_column": ("parquet",),
}


def _check_own_data(cfg: Config) -> None:
    """The data.* keys of a user's data set, and noise settings that need a built-in one or a
    known noise rate; keys that only a user's data set reads are refused for a built-in one."""
    d, own = cfg.data, cfg.data.name in USER_DATASETS
    if own and not d.path:
        raise ConfigError(f"data.path: got null; allowed with data.name {d.name!r}: a path to your data")
    defaults = DataConfig()
    for key, readers in OWN_DATA_KEYS.items():
        if d.name not in readers and getattr(d, key) != getattr(defaults, key):
            raise ConfigError(
                f"data.{key}: got {getattr(d, key)!r}; allowed only with data.name {' or '.join(readers)}"
            )
    if d.image_size is not None and d.image_size < 1:
        raise ConfigError(f"data.image_size: got {d.image_size}; allowed: an integer >= 1 or null")
    if d.num_classes is not None and d.num_classes < 2:
        raise ConfigError(f"data.num_classes: got {d.num_classes}; allowed: an integer >= 2 or null")
    if own and cfg.noise.type == "asymmetric":
        raise ConfigError(
            f"noise.type: got 'asymmetric', which has class maps for built-in data sets only; allowed with "
            f"data.name {d.name!r}: none, symmetric, pairflip, matrix, labels"
        )
    defaults = NoiseConfig()
    given = [k for k in ("labels", "labels_key", "labels_coverage") if getattr(cfg.noise, k) != getattr(defaults, k)]
    if cfg.noise.type != "labels" and given:
        key = f"noise.{given[0]}"
        raise ConfigError(f"{key}: got {getattr(cfg.noise, given[0])!r}; allowed only with noise.type 'labels'")
    method = methods.get(cfg.method)
    unknown_rate = cfg.noise.type == "labels" or (own and cfg.noise.type == "none")
    needs_rate = method.needs_noise_rate(cfg) and not grid_sets_method(cfg)
    if needs_rate and unknown_rate and cfg.coteaching.forget_rate is None:
        raise ConfigError(
            "coteaching.forget_rate: got null, but the noise rate of these labels is unknown (the small-loss rule "
            f"of {cfg.method} needs it); allowed: your estimate of the share of wrong labels in [0, 1]"
            + method.noise_rate_hint
        )


def grid_sets_method(cfg: Config) -> bool:
    """Whether every point of the config's sweep grid sets its own method (a `method` axis, or a
    `variant` axis each of whose variants names one): the top-level method then never runs, and
    only what the points run is checked (`cmd_ray.grid.check_grid` validates each point)."""
    grid = cfg.sweep.grid
    variants = grid.get("variant")
    return "method" in grid or (
        isinstance(variants, list) and bool(variants) and all(isinstance(v, dict) and "method" in v for v in variants)
    )


def _check_cluster(cfg: Config) -> None:
    """Ray resources, fault tolerance, checkpoints, sweep naming, and batch vs replicas."""
    r = cfg.ray
    if r.num_cpus is not None and r.num_cpus <= 0:
        raise ConfigError(f"ray.num_cpus: got {r.num_cpus}; allowed: a number > 0 or null")
    if r.cpus_per_worker is not None:
        check_above("ray.cpus_per_worker", r.cpus_per_worker, 0, inclusive=True)
    if not 0 < r.gpus_per_worker <= 1 and not (r.gpus_per_worker >= 1 and float(r.gpus_per_worker).is_integer()):
        raise ConfigError(
            f"ray.gpus_per_worker: got {r.gpus_per_worker}; allowed: a fraction in (0, 1] or a whole number"
        )
    if r.max_failures < -1:
        raise ConfigError(f"ray.max_failures: got {r.max_failures}; allowed: an integer >= -1")
    check_positive("ray.checkpoint_every", r.checkpoint_every)
    check_positive("ray.checkpoints_to_keep", r.checkpoints_to_keep)
    check_positive("sweep.max_concurrent_trials", cfg.sweep.max_concurrent_trials)
    check_above("sweep.cpus_per_trial", cfg.sweep.cpus_per_trial, 0)
    check_above("sweep.gpus_per_trial", cfg.sweep.gpus_per_trial, 0)
    if cfg.sweep.placement == "trial" and cfg.replicas > 1:
        raise ConfigError(
            f"sweep.placement: got 'trial' with replicas={cfg.replicas}; allowed: 'workers' or 'auto' "
            "(data-parallel replicas run as Ray Train workers)"
        )
    if not cfg.sweep.name or "/" in cfg.sweep.name:
        raise ConfigError(f"sweep.name: got {cfg.sweep.name!r}; allowed: a non-empty name without '/'")
    if cfg.batch_size < cfg.replicas:
        raise ConfigError(f"batch_size: got {cfg.batch_size}; allowed: at least replicas={cfg.replicas}")
    if cfg.batch_size % cfg.replicas:
        raise ConfigError(f"batch_size: got {cfg.batch_size}; allowed: a multiple of replicas={cfg.replicas}")


def validate(cfg: Config) -> Config:
    """Check the relations between fields; raise ConfigError naming the first bad one."""
    _check_run_shape(cfg)
    _check_method(cfg)
    _check_models_and_data(cfg)
    _check_own_data(cfg)
    _check_cluster(cfg)
    return cfg


# --------------------------------------------------------------------------------------
# Loading: YAML file + overrides.


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], value), the value parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set: got {text!r}; allowed: KEY=VALUE, e.g. noise.rate=0.4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: got {text!r}; allowed: KEY=VALUE with a dotted key, e.g. data.name=cifar10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `values` (nested dicts) with each `a.b=value` override applied."""
    out = _deep_copy(values)
    for text in overrides:
        path, value = parse_override(text)
        out = set_path(out, ".".join(path), value)
    return out


def _deep_copy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset into nested dicts; a missing or malformed file raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--config: cannot read {path}: {err.strerror or err}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys, got {type(values).__name__}")
    return values


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts."""
    return validate(_build(Config, values))


def load_config(
    path: Optional[str | Path] = None, overrides: Optional[list[str]] = None, values: Optional[dict[str, Any]] = None
) -> Config:
    """Load a YAML preset (or the defaults), apply `a.b=value` overrides, then `values` (dotted
    key -> value, taken as given, e.g. a command-line flag), and validate. The Config is not
    changed after this."""
    nested = apply_overrides(read_yaml(path) if path else {}, overrides or [])
    for key, value in (values or {}).items():
        nested = set_path(nested, key, value)
    return from_dict(expand_environment(nested))


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_environment(values: Any, where: str = "") -> Any:
    """Replace `${NAME}` in string values with the environment variable NAME (e.g. the cloud
    presets' s3://${CMD_RAY_BUCKET}/...); an unset NAME is a ConfigError naming the key."""
    if isinstance(values, dict):
        return {k: expand_environment(v, f"{where}.{k}" if where else str(k)) for k, v in values.items()}
    if isinstance(values, list):
        return [expand_environment(v, f"{where}[{i}]") for i, v in enumerate(values)]
    if not isinstance(values, str):
        return values

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(
                f"{where}: ${{{name}}} is not set in the environment; allowed: export {name}=... "
                "(cluster.yaml sets CMD_RAY_BUCKET on every node) or write the value itself"
            )
        return os.environ[name]

    return _ENV_REFERENCE.sub(replace, values)


# --------------------------------------------------------------------------------------
# Paths

# Keys that hold a local path or a URI.
PATH_KEYS = (
    "output_dir",
    "data.root",
    "data.path",
    "data.test_path",
    "noise.matrix",
    "noise.labels",
    "ray.storage_path",
    "sweep.storage_path",
)


def with_absolute_paths(cfg: Config) -> Config:
    """The config with every relative local path (in PATH_KEYS, and in a grid over one of them)
    made absolute against this process's working folder: a Tune trial runs in a folder of its
    own, where `data.path: digits` would name nothing."""

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or not value or is_uri(value):
            return value
        return str(local(value).resolve())

    values = cfg.to_dict()
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        node = values.get(section) if section else values
        if isinstance(node, dict) and name in node:
            node[name] = absolute(node[name])
        if key in values["sweep"]["grid"]:
            values["sweep"]["grid"][key] = [absolute(v) for v in values["sweep"]["grid"][key]]
    return from_dict(values)


def set_path(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Copy of nested `values` with `dotted` (e.g. noise.rate) set to `value`."""
    out = _deep_copy(values)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section; cannot set a key inside it")
        node = child
    node[parts[-1]] = value
    return out


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"noise": {"rate": 0.4}} -> {"noise.rate": 0.4}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
