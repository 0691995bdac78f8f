"""One validated configuration for a CMD run: the run settings, assembled with the sections
(`cmd_ray.sections`) and each method's own (`cmd_ray.methods`) into `Config`, built from nested
dicts with type checks, and the checks of the relations between fields.

Every key a user can set is a field here or in those modules, with its default and a comment.
Values are checked before any work starts; a bad value raises `ConfigError` whose message is one
line naming the field, the value and what is allowed. Files, `--set` overrides and `${ENV}`
references are read by `cmd_ray.presets`. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from cmd_ray import methods
from cmd_ray.catalogue import MODEL_INPUT_SIZE, MODELS, USER_DATASETS, model_fit_error
from cmd_ray.datasets import DATASETS
from cmd_ray.errors import ConfigError, check_above, check_positive, check_range
from cmd_ray.sections import (
    NOISE_READS,
    DataConfig,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    RayConfig,
    SweepConfig,
    TestingConfig,
    WandbConfig,
)

METHODS = methods.NAMES


@dataclass
class _RunSettings:
    # Method by name, one of cmd_ray.methods.NAMES: ce (zero knowledge) | dml (all knowledge) |
    # coteaching | coteaching+ | jocor | dividemix | cmd-s | cmd-p (`cmd-ray methods` lists them).
    # Their settings are the methods' sections: knowledge, distill, labels (CMD), coteaching (the
    # small-loss schedule), coteaching_plus, jocor, dividemix; each defined, with its defaults, in
    # cmd_ray/methods/.
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

    def unread(self, key: str) -> Optional[str]:
        """Why this run never reads the dotted config key `key` (or any key of the section `key`
        names), e.g. "method ce does not read coteaching.*; read by coteaching, ..."; None when it reads it."""
        section, _, rest = key.partition(".")
        method = methods.get(self.method)
        if section in methods.SECTIONS and section not in method.reads:
            users = ", ".join(name for name, m in methods.REGISTRY.items() if section in m.reads)
            return f"method {self.method} does not read {section}.*; read by {users}"
        if section == "noise" and rest and rest != "type" and rest not in self.noise.reads():
            return f"noise.type {self.noise.type} does not read it"
        return method.unread_keys(self).get(key)

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


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts."""
    return validate(_build(Config, values))


__all__ = [
    "NOISE_READS",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "NoiseConfig",
    "OptimConfig",
    "RayConfig",
    "SweepConfig",
    "TestingConfig",
    "WandbConfig",
    "check_models_fit",
    "from_dict",
    "grid_sets_method",
    "validate",
]
