"""Errors a user can meet, and the one-line range checks that raise them; imports nothing of the
package (and nothing heavy), so the command line can name every error without loading torch."""

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
