"""Every error cmd-ray raises on purpose, and the one-line range checks that raise them; imports
nothing of the package (and nothing heavy), so the command line can name every error without
loading torch."""

from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A configuration value is not allowed; the message is one line naming the field."""


class NoiseError(ValueError):
    """A noise specification is not allowed; the message is one line naming the field."""


class DataError(RuntimeError):
    """Data are missing or unreadable; the message names the path and what to do."""


class NonFiniteLossError(FloatingPointError):
    """A peer's loss became NaN or inf; training stops rather than training through it."""


class StorageError(OSError):
    """A result could not be written (storage full, over quota, read-only); the message is one
    line naming the file, and the previous version of that file is untouched."""


class RayStartError(RuntimeError):
    """A local Ray did not start (twice): the message is one line with Ray's reason."""


class SweepStopped(RuntimeError):
    """A sweep stopped by SIGINT or SIGTERM before every trial finished: the message says which
    finished and how to resume; the command exits with `exit_status` (130 for Ctrl-C)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class ExchangeMisalignedError(RuntimeError):
    """Peers disagree on which samples a batch holds: never train on misaligned logits."""


class DataMismatchError(RuntimeError):
    """A worker's training data differ from the driver's: never train on other labels."""


def check_range(name: str, value: float, low: float, high: float) -> None:
    """`name` holds a number in [low, high]."""
    if not low <= value <= high:
        raise ConfigError(f"{name}: got {value!r}; allowed: a number in [{low}, {high}]")


def check_positive(name: str, value: Optional[int]) -> None:
    """`name` holds an integer >= 1 (or null)."""
    if value is not None and value < 1:
        raise ConfigError(f"{name}: got {value!r}; allowed: an integer >= 1")


def check_above(name: str, value: float, low: float, inclusive: bool = False) -> None:
    """`name` holds a number > low (>= low when inclusive)."""
    if value < low or (value == low and not inclusive):
        raise ConfigError(f"{name}: got {value}; allowed: a number {'>=' if inclusive else '>'} {low:g}")
