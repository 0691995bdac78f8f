"""A sweep's grid: its points, `variant` axes, and the validated config of each point.

`sweep.grid` maps dotted config keys to lists of values; every combination is a point, and each
point is one trial. The points are expanded here once, validated before any cluster work, and
handed to Tune as they are (one `grid_search` over the points), so what was checked is what runs.
Ray-free and torch-free: the command line checks a grid in well under a second.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

from cmd_ray.config import Config, ConfigError, from_dict
from cmd_ray.errors import NoiseError
from cmd_ray.noise import check_noise_files
from cmd_ray.presets import set_path

# Keys no grid may sweep: they say how and where the sweep runs, not what a trial is.
GRID_FORBIDDEN = ("sweep", "ray", "output_dir")


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest:
    [{"noise.rate": 0.2, "method": "ce"}, ...]. The sweep's one expansion: Tune runs these points."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


# A grid axis whose values each set several keys together, e.g. a method with its own settings:
# variant: [{method: ce}, {method: cmd-p, label: "cmd-p, all knowledge", knowledge.tau_end: 0.0}].
# `label` (optional) names the variant in reports; `reference: true` marks one shown beside the
# candidates of a validation sweep but never chosen; the other keys are dotted config keys.
VARIANT = "variant"
VARIANT_META = ("label", "reference")


def point_overrides(point: dict[str, Any]) -> dict[str, Any]:
    """A grid point as dotted key -> value, with a `variant` axis spread into its keys."""
    out = {}
    for key, value in point.items():
        if key == VARIANT:
            out.update({k: v for k, v in value.items() if k not in VARIANT_META})
        else:
            out[key] = value
    return out


def variant_label(point: dict[str, Any]) -> Optional[str]:
    """How reports name a point's variant: its `label`, else its method when that is all it sets,
    else its keys and values; None without one."""
    variant = point.get(VARIANT)
    if variant is None:
        return None
    if set(variant) == {"method"}:
        return str(variant["method"])
    return variant.get("label") or ", ".join(f"{k}={v}" for k, v in variant.items() if k not in VARIANT_META)


def trial_config(base: dict[str, Any], point: dict[str, Any]) -> Config:
    """The validated config of one grid point: `base` (nested dicts) with the point's values set
    (and no grid of its own: the point is one run, checked as the method it runs)."""
    values = set_path(base, "sweep.grid", {})
    for key, value in point_overrides(point).items():
        values = set_path(values, key, value)
    return from_dict(values)


def _check_grid_key(key: str, where: str) -> None:
    if key.split(".")[0] in GRID_FORBIDDEN:
        raise ConfigError(f"{where}: not sweepable; allowed: keys of the run config (e.g. noise.rate)")


def check_grid(cfg: Config) -> list[dict[str, Any]]:
    """Validate every grid point before any cluster work; return the points.

    Refuses keys outside the run config (sweep.*, ray.*, output_dir), a `variant` value that
    is not a mapping of keys, and any combination that would not validate or whose noise files
    do not fit, naming the grid key and value.
    """
    base = cfg.to_dict()
    for key, values in cfg.sweep.grid.items():
        _check_grid_key(key, f"sweep.grid.{key}")
        if key != VARIANT:
            continue
        for i, variant in enumerate(values):
            where = f"sweep.grid.{VARIANT}[{i}]"
            if not isinstance(variant, dict) or not variant:
                raise ConfigError(f"{where}: got {variant!r}; allowed: a mapping of dotted config keys to values")
            for inner in variant:
                if inner not in VARIANT_META:
                    _check_grid_key(str(inner), f"{where}.{inner}")
            if not isinstance(variant.get("label", ""), str):
                raise ConfigError(f"{where}.label: got {variant['label']!r}; allowed: a string")
            if not isinstance(variant.get("reference", False), bool):
                raise ConfigError(f"{where}.reference: got {variant['reference']!r}; allowed: true or false")
    points = grid_points(cfg.sweep.grid)
    trials = []
    for point in points:
        try:
            trial = trial_config(base, point)
            check_noise_files(trial)
        except (ConfigError, NoiseError) as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"sweep.grid: the point {shown} is refused: {err}") from None
        trials.append(trial)
    _check_every_key_is_read(cfg.sweep.grid, points, trials)
    return points


def _check_every_key_is_read(grid: dict[str, list], points: list[dict[str, Any]], trials: list[Config]) -> None:
    """Refuse a grid key (or a variant's key) that none of its trials reads: its trials would be
    named by values that change nothing (e.g. labels.mixture_threshold under labels.trust small_loss)."""
    for key in grid:
        if key == VARIANT:
            continue
        why = _unread_everywhere(key, [(point[key], trial) for point, trial in zip(points, trials)])
        if why:
            raise ConfigError(f"sweep.grid.{key}: no trial of this grid reads it ({why}); {_ALLOWED}")
    for i, variant in enumerate(grid.get(VARIANT, [])):
        own = [trial for point, trial in zip(points, trials) if point[VARIANT] is variant]
        for key, value in variant.items():
            why = None if key in VARIANT_META else _unread_everywhere(key, [(value, trial) for trial in own])
            if why:
                raise ConfigError(
                    f"sweep.grid.{VARIANT}[{i}].{key}: no trial of this variant reads it ({why}); {_ALLOWED}"
                )


_ALLOWED = "allowed: keys its trials read (a variant can set the key with the setting that reads it)"


def _unread_everywhere(key: str, values_and_trials: list[tuple[Any, Config]]) -> Optional[str]:
    """Why no trial reads what `key` sets (each trial with its value of it), or None if one does.
    A section-valued key (`coteaching: [{forget_rate: 0.2}, ...]`) sets each key of its value."""
    reasons = []
    for value, trial in values_and_trials:
        keys = [f"{key}.{k}" for k in value] if "." not in key and isinstance(value, dict) else [key]
        why = [trial.unread(k) for k in keys]
        if not all(why):
            return None
        reasons.append(why[0])
    return reasons[0] if reasons else None


def grid_point(params: dict[str, Any]) -> dict[str, Any]:
    """The grid point of a trial's Tune config, which is {"point": <grid point>, "base": <the
    sweep's config as nested dicts>, "folder": <the sweep folder>} (`cmd_ray.sweep.build_tuner`)."""
    return params["point"]
