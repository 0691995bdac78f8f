"""Every noisy-label method cmd-ray trains, by name: the one list of them.

To add one: write a module beside these (a `Method` subclass, see `cmd_ray.methods.base`),
import it here and put its instance in `_ALL`. Config validation, the catalogue of names,
report ordering, the GPU check and sweep variants all read this registry.
"""

from __future__ import annotations

from cmd_ray.errors import ConfigError
from cmd_ray.methods import ce, cmd, coteaching, coteaching_plus, dividemix, dml, jocor
from cmd_ray.methods.base import EPOCH_VALUES, Method, Plan, StepInputs, StepSchedule

# Baselines first, CMD last: the order of every report table.
_ALL: tuple[Method, ...] = (
    ce.METHOD,
    dml.METHOD,
    coteaching.METHOD,
    coteaching_plus.METHOD,
    jocor.METHOD,
    dividemix.METHOD,
    cmd.CMD_S,
    cmd.CMD_P,
)
REGISTRY: dict[str, Method] = {m.name: m for m in _ALL}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def _sections() -> dict[str, type]:
    sections: dict[str, type] = {}
    for method in reversed(_ALL):  # the default method's (CMD's) sections first
        for key, section in method.sections.items():
            if key in sections and sections[key] is not section:
                raise TypeError(f"config section {key!r} is defined by two methods; one defines it, others read it")
            sections[key] = section
    return sections


# Config sections the methods bring: key -> dataclass.
SECTIONS: dict[str, type] = _sections()


def get(name: str) -> Method:
    """The method registered as `name`; ConfigError naming `method` if there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method: got {name!r}; allowed: one of {', '.join(NAMES)}") from None


__all__ = ["EPOCH_VALUES", "NAMES", "REGISTRY", "SECTIONS", "Method", "Plan", "StepInputs", "StepSchedule", "get"]
