"""What a run is: the settings its results depend on, kept in its folder, so that a named run
(or a resumed sweep) continues only with the settings it started with. Resumed under others it
would report them beside results it never computed; here that is one ConfigError, before any
work, naming each key that differs and both values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmd_ray.config import Config, ConfigError, from_dict
from cmd_ray.presets import flatten, with_absolute_paths
from cmd_ray.storage import exists, join, read_bytes, write_json_atomic

# Keys that say where and how a run executes, not what it computes: a named run resumed (or a
# sweep continued) may change them. Everything else is the run's identity.
EXECUTION_KEYS = ("ray.", "sweep.", "testing.", "output_dir", "data.root", "use_gpu")
SETTINGS_FILE = "settings.json"  # in a named run's (or a sweep's) folder: its identity
# Files a run reads by path whose content, not only their name, is what it computes from: a labels
# file (or matrix) edited in place, under the same name, and the run resumed would report one run
# of two label sets. Their content is part of the identity, under "content of <path>".
CONTENT_KEYS = ("noise.labels", "noise.matrix")
CONTENT_PREFIX = "content of "


def run_identity(cfg: Config, sweep: bool = False) -> dict[str, Any]:
    """The settings a run's results depend on, as dotted keys with local paths made absolute:
    every key but the EXECUTION_KEYS; for a sweep (`sweep`), also its grid."""
    flat = flatten(with_absolute_paths(cfg).to_dict())
    kept = {k: v for k, v in flat.items() if not k.startswith(EXECUTION_KEYS)}
    if sweep:
        kept.update({k: v for k, v in flat.items() if k.startswith("sweep.grid")})
    for path in sorted({p for key, p in _values(kept) if key.endswith(CONTENT_KEYS) and isinstance(p, str)}):
        kept[CONTENT_PREFIX + path] = _digest(path)
    return json.loads(json.dumps(kept, sort_keys=True, default=str))  # as it reads back from the file


def _values(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf in nested dicts and lists; a list adds no key part (a
    grid's `noise: [{type: labels, labels: a.csv}]` yields ("sweep.grid.noise.labels", "a.csv"))."""
    if isinstance(node, dict):
        for name, child in node.items():
            yield from _values(child, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for child in node:
            yield from _values(child, key)
    else:
        yield key, node


def _digest(path: Any) -> Any:
    """'sha256:<16 hex>' of a local file's bytes; None for what is not one (unset, a URI, missing:
    reading it fails on its own, naming the key)."""
    if not isinstance(path, str) or "://" in path or not Path(path).expanduser().is_file():
        return None
    digest = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    return "sha256:" + digest[:16]


def identity_differences(started: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: <value it started with> then, <value> now' for every key where the two differ. A key
    the run's settings lack (one a later cmd-ray added) that holds its default now is no
    difference: a new key's default is what cmd-ray did before the key existed; nor is a file's
    content that the run's settings lack (saved before cmd-ray kept it)."""
    missing = object()
    defaults = run_identity(from_dict({}))
    out = []
    for key in sorted(set(started) | set(now)):
        before, after = started.get(key, missing), now.get(key, missing)
        if before is missing and key in defaults and after == defaults[key]:
            continue
        if before is missing and key.startswith(CONTENT_PREFIX):
            continue  # saved before cmd-ray kept files' content: its name is all that can be checked
        if before != after:
            shown = ["(not set)" if v is missing else json.dumps(v) for v in (before, after)]
            out.append(f"{key} {shown[0]} then, {shown[1]} now")
    return out


def check_same_run(folder: str, cfg: Config, field: str, new_one: str, sweep: bool = False) -> bool:
    """Whether `folder` holds a run (or sweep) already; refuse `cfg` with one ConfigError naming
    `field` and every key whose value differs from the settings it started with (`new_one` says
    how to start another instead). A run's results are those of the settings it started with:
    resumed under others it would report them beside results it never computed."""
    path = join(folder, SETTINGS_FILE)
    if not exists(path):
        return False
    started = json.loads(read_bytes(path))["identity"]
    differences = identity_differences(started, run_identity(cfg, sweep))
    if differences:
        what = "sweep" if sweep else "run"
        raise ConfigError(
            f"{field}: the {what} at {folder} was started with other settings ({'; '.join(differences)}); "
            f"allowed: the settings it started with, to continue it, or {new_one} for a new {what}"
        )
    return True


def save_run_settings(folder: str, cfg: Config, sweep: bool = False) -> None:
    """Record what a run (or sweep) is, in its folder, for `check_same_run` on its next start."""
    write_json_atomic(join(folder, SETTINGS_FILE), {"identity": run_identity(cfg, sweep)})
