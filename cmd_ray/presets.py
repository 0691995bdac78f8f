"""A config as files and command lines give it: YAML presets, `--set a.b=value` overrides,
`${ENV}` references, dotted keys, and local paths made absolute for Tune's trial folders. Every
path ends in `cmd_ray.config.from_dict`, which builds and checks the `Config`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from cmd_ray.config import Config, from_dict
from cmd_ray.errors import ConfigError
from cmd_ray.storage import is_uri, local


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
